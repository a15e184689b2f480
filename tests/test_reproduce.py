"""reproduce.py: the Markdown cells (measured / paper / difference, mean ± std over seeds), which
results line a cell is skipped for, each table's train.py settings, Table 4 and Figure 5 output, and
end to end on generated images: a table of two cells killed after the first, then resumed."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script
import reproduce
import runs
import train

TINY = ['--clip_model=tiny-test', '--clip_pretrained=random']


@pytest.fixture
def settings(monkeypatch, tmp_path):
    """reproduce.py's settings for a small table, restored after the test."""
    for k, v in dict(DATASETS=('cifar10', 'folder'), BITS=(16, 32, 64), SEEDS=(0,), ROWS=(), EPOCHS=60,
                     CACHE_DIR=str(tmp_path / 'cache'), EXTERNAL='efc', VOCAB='wordnet', PAPER_AS=(),
                     VOCAB_FILES=(), TRAIN_ARGS='').items():
        monkeypatch.setattr(reproduce, k, v)
    return monkeypatch


def cells_of(table, defaults=None):
    defaults = defaults or reproduce.train_defaults()
    return reproduce.make_cells(table, defaults, reproduce.train_args())


# -----------------------------------------------------------------------------
# formatting
def test_cell_text_measured_paper_difference():
    assert reproduce.cell_text([0.9312], 0.931) == '0.931 / 0.931 / +0.000'
    assert reproduce.cell_text([0.9], 0.922) == '0.900 / 0.922 / -0.022'
    # three seeds: mean 0.930, sample std 0.010
    assert reproduce.cell_text([0.92, 0.93, 0.94], 0.922, n_seeds=3) == '0.930 ± 0.010 / 0.922 / +0.008'
    # two of three seeds finished: said so
    assert reproduce.cell_text([0.92, 0.94], 0.922, n_seeds=3) == '0.930 ± 0.014 (n=2) / 0.922 / +0.008'
    # no paper number: '–' for it and the difference; nothing measured: the status, never the paper's value
    assert reproduce.cell_text([0.5], None) == '0.500 / – / –'
    assert reproduce.cell_text([], 0.922, status='failed') == 'failed / 0.922 / –'
    assert reproduce.cell_text([], None) == '– / – / –'


def test_markdown_table_from_hand_made_results(settings):
    settings.setattr(reproduce, 'SEEDS', (0, 1))
    settings.setattr(reproduce, 'ROWS', ('1', '4'))
    cells = cells_of('2')
    assert len(cells) == 2 * 2 * 3 * 2  # rows x datasets x bits x seeds
    measured = {('1', 'cifar10', 16): (0.90, 0.92), ('4', 'cifar10', 64): (0.95, 0.95), ('4', 'folder', 32): (0.5, 0.7)}
    for c in cells:
        values = measured.get((c.row.id, c.dataset, c.bits))
        if values:
            c.result, c.status = dict(map=values[c.seed]), 'trained'
        elif c.row.id == '1' and c.dataset == 'folder' and c.bits == 16:
            c.status = 'failed'
    lines = reproduce.markdown_table('Table 2', 'Measured on ...', reproduce.table_rows('2'), reproduce.DATASETS,
                                     reproduce.BITS, cells, n_seeds=2)
    table = [l for l in lines if l.startswith('| ')]
    assert table[0] == '| row | id | dataset | 16 bits | 32 bits | 64 bits |'
    rows = {tuple(p.strip() for p in l.strip('|').split('|')[1:3]): [p.strip() for p in l.strip('|').split('|')[3:]]
            for l in table[1:]}
    # Table 2 #1 on CIFAR-10 is .922 .926 .925 in the paper
    assert rows[('1', 'CIFAR-10')] == ['0.910 ± 0.014 / 0.922 / -0.012', 'not run / 0.926 / –',
                                       'not run / 0.925 / –']
    # #4 is the full method (= Table 1's best-T2 row: .939 .940 .940)
    assert rows[('4', 'CIFAR-10')][2] == '0.950 ± 0.000 / 0.940 / +0.010'
    # a dataset the paper does not have: measured, and '–' for the paper and the difference
    assert rows[('4', 'folder')] == ['not run / – / –', '0.600 ± 0.141 / – / –', 'not run / – / –']
    assert rows[('1', 'folder')][0] == 'failed / – / –'


def test_paper_numbers_are_the_papers():
    assert reproduce.PAPER[('table1 vgg16', 'cifar10')] == (.887, .888, .885)
    assert reproduce.PAPER[('table3 imgaug', 'mscoco')] == (.733, .785, .819)
    assert reproduce.PAPER[('table6 vit-b-32', 'nuswide')] == (.855, .856, .860)
    assert reproduce.PAPER[('table5 glove', 'flickr25k')] == (.870, .882, .887)
    assert reproduce.PAPER[('table1 cibhash', 'mscoco')] == (.737, .760, .775)
    assert ('table1 cibhash', 'flickr25k') not in reproduce.PAPER  # '-' in the paper's Table 1
    assert len(reproduce.PAPER) == 14 * 4 + 3
    # every row of every table names a paper row that exists (or none; a row may lack a dataset, as CIBHash Flickr25k)
    for table in ('1', '2', '3', '5', '6', 'fig5a', 'fig5b', 'baselines'):
        for row in reproduce.table_rows(table):
            for d in reproduce._PAPER_DATASETS:
                key = row.paper.get(d) if isinstance(row.paper, dict) else row.paper
                assert key is None or key in {r for r, _ in reproduce.PAPER}, (table, row.id, key)


def test_baselines_rows_every_method_and_cibhash_on_vgg16():
    rows = {r.id: r for r in reproduce.table_rows('baselines')}
    assert list(rows) == list(reproduce.METHODS) + ['cibhash-vgg16']
    assert set(reproduce.METHODS) == set(train.baselines.METHODS)  # every method of train.py has a row
    assert 'supervised' in rows['dvsq'].label and 'AQD' in rows['dvsq'].label and 'AQD' not in rows['dhn'].label
    assert 'supervised' not in rows['cibhash'].label
    cells = {(c.row.id, c.dataset): c.settings for c in cells_of('baselines')}
    assert cells[('cibhash-vgg16', 'cifar10')]['BACKBONE'] == 'vgg16'
    assert cells[('cibhash', 'cifar10')]['BACKBONE'] == 'ViT-B-16'
    assert [reproduce.paper_value(rows['cibhash-vgg16'], 'cifar10', b) for b in (16, 32, 64)] == [.590, .622, .641]
    assert reproduce.paper_value(rows['cibhash-vgg16'], 'flickr25k', 16) is None
    assert reproduce.paper_value(rows['cibhash'], 'cifar10', 16) is None  # CLIP features: not the paper's protocol


def test_paper_as_maps_a_dataset_to_another_rows_numbers(settings):
    settings.setattr(reproduce, 'PAPER_AS', ('folder=mscoco',))
    row = reproduce.table_rows('3')[0]  # IMGAUG
    assert [reproduce.paper_value(row, 'folder', b) for b in (16, 32, 64, 128)] == [.733, .785, .819, None]
    assert reproduce.dataset_label('folder') == 'folder (paper: MS-COCO)'
    # ... and its best T2 (Figure 5b) is MS-COCO's
    assert cells_of('1')[-1].settings['T2'] == train.T2_BEST['mscoco']


def test_figure5_paper_points_and_png(settings, tmp_path):
    settings.setattr(reproduce, 'DATASETS', ('cifar10', 'mscoco'))
    settings.setattr(reproduce, 'T2_VALUES', (0.95, 0.97, 0.99))
    settings.setattr(reproduce, 'T1_VALUES', (0.8, 0.9))
    rows = {r.id: r for r in reproduce.table_rows('fig5b')}
    # 64 bits: CIFAR-10's best T2 is 0.99 (Table 1 best row), 0.97 is Table 1's CLIP row; MS-COCO's best is 0.95
    assert reproduce.paper_value(rows['0.99'], 'cifar10', 64) == .940
    assert reproduce.paper_value(rows['0.97'], 'cifar10', 64) == .933
    assert reproduce.paper_value(rows['0.95'], 'cifar10', 64) is None
    assert reproduce.paper_value(rows['0.95'], 'mscoco', 64) == .888
    assert reproduce.paper_value(reproduce.table_rows('fig5a')[1], 'mscoco', 64) == .888  # T1 = 0.9
    parts = []
    for table in ('fig5a', 'fig5b'):
        cells = cells_of(table)
        for k, c in enumerate(cells):
            c.result = dict(map=0.8 + 0.01 * k)
        parts.append((table, cells))
    assert all(c.bits == 64 for _, cells in parts for c in cells)
    reproduce.plot_figure5(parts, str(tmp_path / 'figure5.png'))
    assert os.path.getsize(tmp_path / 'figure5.png') > 10_000


# -----------------------------------------------------------------------------
# which settings each table's cells get
def test_table_settings(settings):
    cells = {(c.table, c.row.id, c.dataset): c.settings for t in ('1', '2', '3', '6') for c in cells_of(t)}
    vgg = cells[('1', 'vgg16', 'cifar10')]
    assert (vgg['BACKBONE'], vgg['BACKBONE_PRETRAINED'], vgg['CLIP_MODEL'], vgg['T2']) == \
        ('vgg16', 'imagenet', 'ViT-B-16', 0.97)
    assert cells[('1', 'clip', 'cifar10')]['BACKBONE'] == 'ViT-B-16' and cells[('1', 'clip', 'cifar10')]['T2'] == 0.97
    assert cells[('1', 'best', 'cifar10')]['T2'] == 0.99 and cells[('1', 'best', 'folder')]['T2'] == 0.97
    assert {k: cells[('2', '3', 'cifar10')][k] for k in ('SIM', 'AUG', 'T2', 'EXTERNAL')} == \
        dict(SIM=False, AUG=True, T2=0.99, EXTERNAL='efc')
    assert [cells[('3', r, 'cifar10')]['EXTERNAL'] for r in ('imgaug', 'imgk', 'ek', 'imgcls', 'efc')] == \
        ['none', 'imgk', 'ek', 'imgcls', 'efc']
    b32 = cells[('6', 'vit-b-32', 'cifar10')]
    assert (b32['BACKBONE'], b32['CLIP_MODEL'], b32['T2']) == ('ViT-B-32', 'ViT-B-32', 0.99)
    # the same cell in two tables records the same train.py config, so it is trained once
    cfg = {(c.table, c.row.id, c.dataset, c.bits): c.cfg for t in ('1', '2', '3', '6') for c in cells_of(t)}
    assert cfg[('1', 'best', 'cifar10', 32)] == cfg[('2', '4', 'cifar10', 32)] == cfg[('3', 'efc', 'cifar10', 32)] \
        == cfg[('6', 'vit-b-16', 'cifar10', 32)]
    assert cfg[('1', 'best', 'cifar10', 32)] != cfg[('1', 'best', 'cifar10', 16)]


def test_vocab_files_become_rows(settings, tmp_path):
    words = tmp_path / 'cn.txt'
    words.write_text('cat\ndog\n')
    settings.setattr(reproduce, 'VOCAB_FILES', (f'conceptnet={words}', f'mine={words}'))
    rows = reproduce.table_rows('5')
    assert [r.id for r in rows] == ['imagenet', 'wordnet', 'conceptnet', 'mine']
    assert reproduce.paper_value(rows[2], 'cifar10', 16) == .938
    assert reproduce.paper_value(rows[3], 'cifar10', 16) is None
    assert cells_of('5')[-1].settings['VOCAB'] == str(words)


# -----------------------------------------------------------------------------
# skip logic: a results line holds a cell when every setting that changes a result agrees
def test_skip_only_a_matching_results_line(settings):
    settings.setattr(reproduce, 'TRAIN_ARGS', '--batch_size=64 --warmup=2')
    defaults = reproduce.train_defaults()
    cell = [c for c in cells_of('2', defaults) if c.row.id == '4' and c.dataset == 'cifar10' and c.bits == 32][0]
    line = dict(dataset='cifar10', method='duheg', bits=32, map=0.5,
                config=json.loads(json.dumps(dict(cell.cfg, RUN_DIR='/elsewhere', RESULTS='x.jsonl', DEVICE='cuda'))))
    assert reproduce.matches(line, cell.cfg, defaults)
    assert line['config']['BATCH_SIZE'] == 64 and line['config']['TAU2'] == 0.8 and line['config']['T2'] == 0.99
    noise = dict(line, config=dict(line['config'], T2=0.99 + 1e-13))
    assert reproduce.matches(noise, cell.cfg, defaults)
    # another cache path matches (a copied cache): what it holds is checked by changed_inputs
    assert reproduce.matches(dict(line, config=dict(line['config'], CACHE_DIR='/other/cache')), cell.cfg, defaults)
    for key, value in dict(EPOCHS=59, T2=0.98, SEED=1, SIM=False, AUG=False, EXTERNAL='ek', BACKBONE='vgg16',
                           BATCH_SIZE=512, WARMUP=10, LR_MAX=2e-4, TAU2=0.2,
                           VOCAB='imagenet', T1=0.8, CLIP_PRETRAINED='random', SPLIT_SEED=1).items():
        assert not reproduce.matches(dict(line, config=dict(line['config'], **{key: value})), cell.cfg, defaults), key
    assert not reproduce.matches(dict(line, bits=16), cell.cfg, defaults)
    assert not reproduce.matches(dict(line, dataset='mscoco'), cell.cfg, defaults)
    assert not reproduce.matches(dict(line, method='ssdh'), cell.cfg, defaults)
    # a line from an older train.py without a setting: fine while the cell has it at its default
    older = dict(line, config={k: v for k, v in line['config'].items() if k != 'RELEASED'})
    assert reproduce.matches(older, cell.cfg, defaults)
    older = dict(line, config={k: v for k, v in line['config'].items() if k != 'BATCH_SIZE'})  # 64 is not the default
    assert not reproduce.matches(older, cell.cfg, defaults)
    # the latest matching line wins; other lines are passed over
    other = dict(line, map=0.7, config=dict(line['config'], SEED=5))
    newer = dict(line, map=0.6)
    assert reproduce.find_result(cell, [line, newer, other], defaults)['map'] == 0.6


def test_read_results_leaves_out_a_line_cut_by_a_kill(tmp_path, capsys):
    path = tmp_path / 'results.jsonl'
    path.write_text(json.dumps(dict(map=0.5)) + '\n' + '{"dataset": "cif')
    assert runs.read_results(str(path)) == [dict(map=0.5)]
    assert '1 unreadable line' in capsys.readouterr().out


def test_table4_reads_selection_json(settings, tmp_path):
    from cache import selection_dir
    settings.setattr(reproduce, 'CLIP_MODEL', 'tiny-test')
    settings.setattr(reproduce, 'CLIP_PRETRAINED', 'random')
    settings.setattr(reproduce, 'ROWS', ('wordnet',))
    settings.setattr(reproduce, 'OUT_DIR', str(tmp_path / 'out'))
    d = selection_dir(os.path.abspath(reproduce.CACHE_DIR), 'wordnet', 'tiny-test', 'random', 800, 0.9, False)
    os.makedirs(d)
    with open(os.path.join(d, 'selection.json'), 'w') as f:
        json.dump(dict(counts=dict(read=117798, unique=117797, t_rep=10, t_cen=790, t_com=800),
                       seconds=dict(embedding=400.0, clustering=50.0, selection=1.5, total=451.5)), f)
    lines, failed = reproduce.table4()
    row = [l for l in lines if l.startswith('| wordnet')][0]
    assert not failed
    assert '117798 / 117797 | 800 | 400.00 / 50.00 / 1.50 / 451.50 | 117797 | 476.79 | -25.29 |' in row
    assert 'this machine; selection.json does not say' in row  # the hardware it names is ours, said so
    with open(os.path.join(d, 'selection.json'), 'w') as f:  # nouns_embed.py records where it ran
        json.dump(dict(counts=dict(read=117798, unique=117797, t_rep=10, t_cen=790, t_com=800), hardware='Some CPU',
                       seconds=dict(embedding=400.0, clustering=50.0, selection=1.5, total=451.5)), f)
    row = [l for l in reproduce.table4()[0] if l.startswith('| wordnet')][0]
    assert row.endswith('| -25.29 | Some CPU |')


# -----------------------------------------------------------------------------
# the command line
def test_command_line_errors(tmp_path):
    base = ['--table=2', '--datasets=folder', f'--out_dir={tmp_path}', f'--cache_dir={tmp_path}']
    cases = [(['--train_args=--sim=false'], '--train_args sets --sim'),
             (['--train_args=--bogus=1'], 'unknown setting --bogus'),
             (['--epochs=3'], 'warm-up'),
             (['--table=7'], "--table='7'"),
             (['--rows=9'], 'table 2 has no row 9'),
             (['--datasets=imagenet'], 'choose from')]
    for args, message in cases:
        proc = run_script('reproduce.py', *base, *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-800:])


def test_dry_run_lists_table1_commands(tmp_path):
    proc = run_script('reproduce.py', '--table=1', '--datasets=cifar10', '--bits=16,64', '--dry_run',
                      f'--out_dir={tmp_path}', f'--cache_dir={tmp_path}/cache')
    cmds = [l for l in proc.stdout.splitlines() if l.startswith('would run: ')]
    assert len(cmds) == 3 and all('--bits=16,64' in c for c in cmds)
    assert '--backbone=vgg16 --backbone_pretrained=imagenet --clip_model=ViT-B-16' in cmds[0]
    assert '--t2=0.97' in cmds[1] and '--t2=0.99' in cmds[2] and '--epochs=60' in cmds[2]
    assert not os.path.exists(tmp_path / 'results.jsonl')


# -----------------------------------------------------------------------------
# end to end: two cells, killed after the first, resumed without training it again
def _lines(path):
    if not os.path.exists(path):
        return []
    out = []
    for l in open(path).read().splitlines(keepends=True):
        if l.endswith('\n'):
            out.append(json.loads(l))
    return out


def test_table_resumes_after_sigkill(image_folder, tmp_path):
    cache, out = str(tmp_path / 'cache'), str(tmp_path / 'out')
    run_script('dataset_extract.py', '--dataset=folder', f'--data_path={image_folder}', '--backbone=tiny-test',
               '--backbone_pretrained=random', f'--cache_dir={cache}', '--num_workers=0', '--aug_views=2')
    # Table 2 rows #2 (SIM only) and #4 (SIM and AUG) at 16 bits, read against CIFAR-10's paper numbers
    args = ['--table=2', '--rows=2,4', '--datasets=folder', '--bits=16', '--epochs=3', '--external=imgk',
            '--train_args=--batch_size=64 --warmup=1', f'--cache_dir={cache}', f'--out_dir={out}',
            '--paper_as=folder=cifar10', *TINY]
    results = os.path.join(out, 'results.jsonl')
    with open(tmp_path / 'first.log', 'w') as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'reproduce.py'), *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and not _lines(results) and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # reproduce.py and its train.py, as a kill of the job would
        proc.wait()
    first = _lines(results)
    assert len(first) == 1, open(tmp_path / 'first.log').read()[-3000:]
    assert first[0]['config']['AUG'] is False and first[0]['config']['T2'] == 0.99  # row #2, CIFAR-10's best T2

    again = run_script('reproduce.py', *args)
    done = _lines(results)
    assert len(done) == 2 and done[0] == first[0]  # the first cell was not trained again
    assert 'cell table=2 row=2 dataset=folder bits=16 seed=0' in again.stdout
    status = {l.split(' row=')[1].split()[0]: l.split('status=')[1].split()[0]
              for l in again.stdout.splitlines() if l.startswith('cell table=2')}
    assert status == {'2': 'skipped', '4': 'trained'}, again.stdout[-2000:]
    assert again.stdout.count('train: python') == 1 and done[1]['config']['AUG'] is True

    # the table: measured from the results file, CIFAR-10's paper numbers (#2: .922, #4: .939) and the difference
    for line, paper in ((done[0], 0.922), (done[1], 0.939)):
        label = '#2 SIM only' if line is done[0] else '#4 SIM and AUG (full)'
        row = [l for l in again.stdout.splitlines() if l.startswith(f'| {label} |')]
        assert len(row) == 1, again.stdout[-2000:]
        assert row[0].endswith(f"| folder (paper: CIFAR-10) | {line['map']:.3f} / {paper:.3f} / "
                               f"{line['map'] - paper:+.3f} |"), row[0]
    md = open(os.path.join(out, 'table2.md')).read()
    assert 'Measured on folder' in md and '3 epochs' in md and 'folder against cifar10' in md
    assert md.count('| folder (paper: CIFAR-10) |') == 2

    # a third run trains nothing
    third = run_script('reproduce.py', *args)
    assert 'train: python' not in third.stdout and len(_lines(results)) == 2
