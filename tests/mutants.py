"""Mutation check of the method's wiring: each mutant is one named, deliberate bug put into a
temporary copy of the project; the tests that should catch it run there and must fail. Prints a
table; exits 1 when a mutant survives (its tests pass) or no longer applies (its code moved: update
the mutant here), 0 when every mutant is caught. The tests run first on the unchanged copy, where
they must pass, so a mutant is never "caught" by a test that fails anyway.

    python tests/mutants.py                 # every mutant (about 7 minutes on 2 cores, CI's size)
    python tests/mutants.py --only=eq8,lr   # some of them, by name
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = 'tests/test_method.py'
STEP = f'{METHOD}::test_one_step_feeds_eq1_what_algorithm2_says'
ABLATIONS = f'{METHOD}::test_ingredients_matter_as_in_tables_2_and_3'

# name: (what breaks, file, the code, the mutant code, the tests that must catch it)
MUTANTS = {
    'lr': ('Eq. 10-11 never applied: the learning rate stays lr_min', 'train.py',
           "            g['lr'] = lr\n", "            g['lr'] = LR_MIN\n", [STEP]),
    'eq8': ('Eq. 8 positives switched off inside train_heads', 'train.py',
            'pos = positives(e[idx], t2, SIM) if e is not None',
            'pos = positives(e[idx], t2, False) if e is not None',
            [STEP, ABLATIONS]),
    'eq8-images': ('Eq. 8 positives from the images instead of the external feature', 'train.py',
                   'pos = positives(e[idx], t2, SIM) if e is not None',
                   'pos = positives(x_train[idx], t2, SIM) if e is not None', [STEP]),
    'he-e': ("He sees another item's external feature", 'train.py',
             'he(e[idx]) if e is not None else None', 'he(e[idx.roll(1)]) if e is not None else None', [STEP]),
    'views': ('the views of epoch t paired as (2t, 2t), not (2t, 2t+1)', 'train.py',
              'return z + 2 * epoch, z + 2 * epoch + 1', 'return z + 2 * epoch, z + 2 * epoch', [STEP]),
    'eq1': ('Eq. 1 leaves out L_b(hv1, he)', 'train.py',
            'pairs = [(hv1, hv2), (hv1, he), (hv2, he)]', 'pairs = [(hv1, hv2), (hv2, he)]',
            ['tests/test_train.py::test_bcl_loss_eq1_sums_three_terms_and_ablations', STEP]),
    'eq9-tau': ("Eq. 9 without its temperature tau2", 'train.py',
                'logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau2',
                'logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T', ['tests/test_train.py']),
    'eq6-softmax': ('Eq. 5-6: the softmax over the images instead of the nouns', 'external.py',
                    'torch.softmax(i @ t.T / tau1, dim=1)',
                    'torch.softmax(i @ t.T / tau1, dim=0)',
                    ['tests/test_train.py::test_external_features_eq5_6_two_nouns']),
    'efc-all-nouns': ('--external=efc (the default) reads every noun instead of the selected ones', 'external.py',
                      "return os.path.join(selection_dir(*nouns, cfg['N_K'], cfg['T1'], cfg['RELEASED'], "
                      "cfg['T1_READING']),\n" + ' ' * 28 + "'selected_feats.npy')",
                      "return os.path.join(vocab_dir(*nouns, cfg['RELEASED']), 'noun_feats.npy')",
                      [METHOD]),
    'eq3-reading': ("Eq. 3's distance reading keeps the nouns near their centre", 'nouns_embed.py',
                    "return (2 - 2 * cos > t1) if reading == 'distance'",
                    "return (2 - 2 * cos < t1) if reading == 'distance'",
                    ['tests/test_released.py::test_eq3_readings_on_a_drawable_example',
                     'tests/test_nouns.py::test_selection_fixed_centres']),
    'eq2-mean': ('Eq. 2 averages the raw prompt features (the normalised mean is the default)', 'nouns_embed.py',
                 'f = (f.float() if raw_mean else F.normalize(f.float(), dim=-1)).cpu().numpy()',
                 'f = f.float().cpu().numpy()',
                 ['tests/test_released.py::test_eq2_raw_mean_and_normalised_mean_on_two_prompts']),
    'norm-swap': ('augment_transform normalises with mean and std swapped', 'views.py',
                  '        T.Normalize(mean, std),\n    ])', '        T.Normalize(std, mean),\n    ])',
                  ['tests/test_views.py::test_default_recipe_is_torchvisions_with_the_backbones_own_normalisation']),
    'view-flip': ('the views made on the device are never flipped', 'views.py',
                  'y[i] = y[i].flip(-1)', 'y[i] = y[i]', ['tests/test_views.py']),
    'view-stream': ('every view of an image draws from one stream', 'views.py',
                    'np.random.SeedSequence([seed, int(i), int(view)])', 'np.random.SeedSequence([seed, int(i), 0])',
                    ['tests/test_views.py::test_every_image_and_view_has_its_own_stream']),
    'topk-unstable': ('the ranking sort made unstable (ties no longer by index)', 'eval_hash.py',
                      "idx = np.argsort(D, axis=1, kind='stable')[:, :k]",
                      "idx = np.argsort(-D, axis=1)[:, ::-1][:, :k]",
                      ['tests/test_eval.py']),
    'ap-over-k': ('AP@K divided by K instead of the relevant items retrieved', 'eval_hash.py',
                  'return np.where(R > 0, s / np.maximum(R, 1), 0.0)', 'return np.where(R > 0, s / rel.shape[1], 0.0)',
                  ['tests/test_eval.py']),
    'hhch-mask': ("HHCH's L_HIC keeps the items of an item's own prototype among its negatives (no false-negative "
                  "mask)", 'methods/hhch.py',
                  'logits = torch.cat([logits01, logits00], dim=1) - mask * _HUGE',
                  'logits = torch.cat([logits01, logits00], dim=1)',
                  ['tests/test_hhch.py::test_masked_infonce_by_hand',
                   'tests/test_hhch.py::test_golden_losses_and_gradients']),
    'mecoq-queue': ("MeCoQ's code memory is filled but never read as negatives", 'methods/mecoq.py',
                    "queue_feats = reconstruct(memory['codes'], head.C) if state['use_queue'] else None",
                    'queue_feats = None', ['tests/test_mecoq.py::test_golden']),
    'cghash-entropy': ("CGHash's entropy term with its sign flipped: the batch collapses onto few clusters",
                       'methods/cghash.py', 'return w * -_entropy(p.mean(dim=0)) + sharp * _entropy(p)',
                       'return w * _entropy(p.mean(dim=0)) + sharp * _entropy(p)',
                       ['tests/test_cghash.py::test_entropy_by_hand', 'tests/test_cghash.py::test_against_golden']),
    'competitor-lr': ("a competitor's learning rate of each step never set (its optimiser's first rate throughout)",
                      'train.py', '                g.update(lr=lr)\n', '                pass\n',
                      ['tests/test_competitors.py::test_competitor_loop_feeds_each_module_what_its_interface_says']),
    'search-words': ("search_index.text_features encodes 'x' whatever words are typed", 'search_index.py',
                     'return nouns_embed.embed_words(list(words), model, tok,',
                     "return nouns_embed.embed_words(['x'] * len(words), model, tok,",
                     ['tests/test_search.py::test_word_query_retrieves_its_class']),
}


def copy_project(dest):
    """The files git tracks or would track (not ignored), as they are in the working tree, into dest."""
    files = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    for f in filter(None, files.split('\0')):
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def pytest(where, tests, timeout=600):
    """(passed, seconds, last line) of the tests run in the copy `where`."""
    t = time.time()
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *tests], cwd=where,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1'))
    lines = [l for l in proc.stdout.strip().splitlines() if l.strip()]
    return proc.returncode == 0, time.time() - t, lines[-1] if lines else proc.stderr[-200:]


def main():
    only = [a.split('=', 1)[1].split(',') for a in sys.argv[1:] if a.startswith('--only=')]
    names = only[0] if only else list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown or any(not a.startswith('--only=') for a in sys.argv[1:]):
        raise SystemExit(f"usage: python tests/mutants.py [--only=NAME,...]; names: {', '.join(MUTANTS)}")
    tmp = tempfile.mkdtemp(prefix='mutants_')
    try:
        clean = os.path.join(tmp, 'clean')
        copy_project(clean)
        tests = sorted({t for n in names for t in MUTANTS[n][4]})
        ok, secs, last = pytest(clean, tests)
        print(f'unchanged project: {len(tests)} test selections {"pass" if ok else "FAIL"} in {secs:.0f} s ({last})')
        if not ok:
            print('mutants: the tests fail without a mutant; fix them first')
            return 1
        rows, survived = [], []
        for n in names:
            what, path, old, new, sel = MUTANTS[n]
            work = os.path.join(tmp, n)
            shutil.copytree(clean, work)
            src = open(os.path.join(work, path)).read()
            if src.count(old) != 1:
                rows.append((n, what, path, 'NO LONGER APPLIES', 0.0, f'its code occurs {src.count(old)} times'))
                survived.append(n)
                continue
            with open(os.path.join(work, path), 'w') as f:
                f.write(src.replace(old, new))
            passed, secs, last = pytest(work, sel)
            rows.append((n, what, path, 'SURVIVED' if passed else 'caught', secs, last))
            if passed:
                survived.append(n)
            shutil.rmtree(work, ignore_errors=True)
            print(f'{n}: {rows[-1][3]} ({secs:.0f} s)', flush=True)
        print('\n| mutant | what breaks | file | outcome | seconds | the tests said |\n|---|---|---|---|---|---|')
        for n, what, path, outcome, secs, last in rows:
            print(f'| {n} | {what} | {path} | {outcome} | {secs:.0f} | {last[:80]} |')
        print(f'\nmutants={len(rows)} caught={len(rows) - len(survived)} survived={len(survived)}'
              + (f' ({", ".join(survived)})' if survived else ''))
        return 1 if survived else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
