"""reproduce.py --table=all end to end on generated images (PAPER_AS lets the generated set stand in for
CIFAR-10; MS-COCO is not downloaded): the dry run writes nothing; killed after its first cell, the command
run again trains only the rest; REPORT.md holds every table and figure section, its numbers are the results
file's, its provenance names the commit and settings, a dataset that is absent is said so in place; and
--report_only gives the same document twice, the run's own."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from conftest import ROOT, run_script

TINY = ['--clip_model=tiny-test', '--clip_pretrained=random', '--cnn_backbone=tiny-test', '--cnn_pretrained=random',
        '--alt_clip=tiny-test', '--alt_clip_pretrained=random']
WORDS = ('cat dog horse bird ship truck car plane frog deer tree house river mountain boat train bus bicycle flower '
         'chair table lamp book phone cup bottle apple orange banana pizza cake clock kite ball shoe hat').split()


def _nouns(tmp_path, cache):
    """A small word list's noun selection (N_k 8, T1 0.5), copied where WordNet's and ImageNet's would be: the
    tiny CLIP through all of WordNet takes minutes."""
    words = tmp_path / 'words.txt'
    words.write_text('\n'.join(WORDS) + '\n')
    run_script('nouns_embed.py', f'--vocab={words}', '--clip_model=tiny-test', '--clip_pretrained=random',
               f'--cache_dir={cache}', '--n_k=8', '--t1=0.5')
    nouns = os.path.join(cache, 'nouns')
    for vocab in ('wordnet', 'imagenet'):  # each copy's sidecars name the vocabulary it stands for
        copy = os.path.join(nouns, f'{vocab}_tiny-test_random')
        shutil.copytree(os.path.join(nouns, 'file-words_tiny-test_random'), copy)
        for sidecar in glob.glob(os.path.join(copy, '**', '*.npy.json'), recursive=True):
            meta = json.load(open(sidecar))
            meta['settings']['vocab'] = vocab
            json.dump(meta, open(sidecar, 'w'))


def _lines(path):
    """The whole lines of a results file (a line cut by a kill is not one)."""
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path).read().splitlines(keepends=True) if l.endswith('\n')]


def _killed_after_first_cell(args, results, log):
    """Start reproduce.py and SIGKILL it with its train.py once the first cell is in the results file."""
    with open(log, 'w') as f:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'reproduce.py'), *args], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and not _lines(results) and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # reproduce.py and its train.py, as a kill of the job would
        proc.wait()
    return _lines(results)


def _cell(report, label, dataset='folder (paper: CIFAR-10)'):
    """The 64-bit cell of the table line of `label` (the first table that has it) in REPORT.md."""
    line = next(l for l in report.splitlines() if l.startswith(f'| {label} |') and f'| {dataset} |' in l)
    return line.rstrip(' |').split(' | ')[-1]


def test_report_end_to_end(run, tmp_path):
    cache, out = str(tmp_path / 'cache'), tmp_path / 'out'
    shutil.copytree(run[1], cache)  # the session's extracted generated images (tiny-test features, 2 views)
    _nouns(tmp_path, cache)
    args = ['--table=all', '--datasets=folder,mscoco', '--bits=64', '--epochs=3', '--n_k=8', '--t1=0.5',
            '--t1_values=0.5', '--t2_values=0.97,0.99', '--methods=duheg,lsh', '--paper_as=folder=cifar10',
            '--train_args=--batch_size=64 --warmup=1', f'--cache_dir={cache}', f'--out_dir={out}', *TINY]

    dry = run_script('reproduce.py', *args, '--dry_run').stdout
    assert not out.exists()  # the dry run writes nothing
    assert 'to train: folder seed 0, 64 bits: table 1 row vgg16 (DUH-EG, VGG-16, T2 = 0.97), table 1 row clip' in dry
    assert re.search(r'features: missing \(\S+/mscoco/tiny-test-random/images\.npy\.json is missing\); would run '
                     r'first: python dataset_extract\.py --dataset=mscoco', dry)
    assert 'estimated GPU time' in dry and 'nothing was written (--dry_run)' in dry

    killed = _killed_after_first_cell(args, str(out / 'results.jsonl'), tmp_path / 'first.log')
    assert len(killed) == 1, (tmp_path / 'first.log').read_text()[-3000:]
    again = run_script('reproduce.py', *args, check=False)  # MS-COCO's cells fail: its features are absent
    assert again.returncode == 1 and 'cells failed' in again.stderr, again.stderr[-2000:]
    assert again.stdout.count('train: python') == 10  # the eleven runs less the one done before the kill
    assert _lines(out / 'results.jsonl')[0] == killed[0]  # not trained again
    report = (out / 'REPORT.md').read_text()
    table2 = (out / 'table2.md').read_text()  # each table's own file too
    assert 'Measured on folder, mscoco' in table2 and '3 epochs' in table2 and 'folder against cifar10' in table2
    for heading in ('## Summary', '## Contents', '## Table 1:', '## Table 2:', '## Table 3:', '## Table 4:',
                    '## Table 5:', '## Table 6:', '## Baselines', '## Figure 3:', '## Figure 4:', '## Figure 5:',
                    '### Figure 5a:', '### Figure 5b:', '## Figure 6:', '## Figure 7:', '## Missing cells',
                    '## Provenance'):
        assert f'\n{heading}' in report, heading
    pictures = re.findall(r'!\[[^]]*\]\(([^)]+)\)', report)
    assert {'figure3_folder.png', 'figure4_folder.png', 'figure5.png', 'figure6_folder_0.png',
            'figure7_folder_0.png'} <= set(pictures) and all((out / p).stat().st_size > 5000 for p in pictures)
    assert "The paper gives Figures 3 and 4 only as plots, so no paper points are drawn" in report

    # every number is the results file's: each provenance row's MAP and run key, and the table cells it serves
    results = [json.loads(l) for l in (out / 'results.jsonl').read_text().splitlines()]
    rows = [l.strip('| ').split(' | ') for l in report.split('## Provenance')[1].splitlines()
            if re.match(r'\| \d+ \|', l)]
    assert len(rows) == len(results) == 11  # 21 cells on folder, shared cells trained once
    by_key = {r['run_key'][:12]: r for r in results}
    for row in rows:
        r = by_key[row[11].strip('`')]
        assert row[6] == f"{r['map']:.4f}" and row[5] == '0' and row[4] == '64'
        assert row[15] == f"`{r['heads_sha256'][:16]}`" and row[13] == f"`{r['inputs']['features'][:12]}`"
        for served in row[1].split('; '):
            table, row_id = re.fullmatch(r'(.+) row (\S+)', served).groups()
            section = report.split(f"\n## {table}" if not table.startswith('Figure') else f"\n### {table}")[1]
            line = next(l for l in section.splitlines() if l.startswith('| ') and f'| {row_id} | folder' in l)
            assert line.split(' | ')[-1].startswith(f"{r['map']:.3f} / "), (served, line)
    assert _cell(report, 'LSH') == f"{next(r for r in results if r['method'] == 'lsh')['map']:.3f} / – / –"

    # provenance: the commit, the settings, the machine
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    assert f'assembled by commit {commit}' in report and f'trained by commit: {commit}' in report
    assert all(r['commit'].startswith(commit) and r['machine']['torch'] for r in results)
    assert '`--epochs=3`' in report and '`--batch_size=64`' in report and '`--n_k=8`' in report
    assert '--external=imgk' in report and '--sim=false' in report  # a run's own settings
    assert f"the newest written {max(r['date'] for r in results)}" in report

    # MS-COCO is absent: said in each table's place, in the figures and the missing cells, and nothing invented
    table1 = report.split('\n## Table 1:')[1].split('\n## ')[0]
    assert '| DUH-EG, CLIP ViT-B/16, T2 = 0.97 | clip | MS-COCO | failed / 0.887 / – |' in table1
    assert re.search(r'- Table 1 rows vgg16, vgg16-best, clip, best on mscoco at 64 bits, seed 0: no tiny-test '
                     r'features of mscoco \(\S+ is missing\): run python dataset_extract\.py --dataset=mscoco', table1)
    assert "- MS-COCO: Table 1's CLIP row at 64 bits is not measured: no tiny-test features of mscoco" in report

    rebuilt = run_script('reproduce.py', *args, '--report_only').stdout
    assert 'train: python' not in rebuilt and '22 of 44 cells in' in rebuilt
    assert re.search(r'missing:\n- Table 1 rows vgg16, vgg16-best, clip, best on mscoco at 64 bits, seed 0: no '
                     r'tiny-test', rebuilt)
    once = (out / 'REPORT.md').read_text()
    run_script('reproduce.py', *args, '--report_only')
    assert (out / 'REPORT.md').read_text() == once == report  # the same document twice, and the run's own
    assert len(results) == len(_lines(out / 'results.jsonl'))  # nothing trained
