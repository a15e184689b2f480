"""reproduce.py: the Markdown cells (measured / paper / difference, mean ± std over seeds, marked outside
tolerance), which results line a cell is skipped for, each table's train.py settings, Table 4 and Figure 5
output, the dry run's plan. End to end (killed, resumed, the report): tests/test_report.py."""
import json
import os

import pytest

import paper
from conftest import run_script
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
    # one seed: a difference beyond 0.01 is marked (bold), one within it is not
    assert reproduce.cell_text([0.9], 0.922) == '0.900 / 0.922 / **-0.022**'
    assert reproduce.cell_text([0.913], 0.922) == '0.913 / 0.922 / -0.009'
    # three seeds: mean 0.930, sample std 0.010
    assert reproduce.cell_text([0.92, 0.93, 0.94], 0.922, n_seeds=3) == '0.930 ± 0.010 / 0.922 / +0.008'
    # ... marked once the mean is more than 2 std from the paper's value: 0.950 is 0.028 > 2 x 0.010 from 0.922
    assert reproduce.cell_text([0.94, 0.95, 0.96], 0.922, n_seeds=3) == '0.950 ± 0.010 / 0.922 / **+0.028**'
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
    assert rows[('4', 'CIFAR-10')][2] == '0.950 ± 0.000 / 0.940 / **+0.010**'  # beyond 2 x std 0: marked
    # a dataset the paper does not have: measured, and '–' for the paper and the difference
    assert rows[('4', 'folder')] == ['not run / – / –', '0.600 ± 0.141 / – / –', 'not run / – / –']
    assert rows[('1', 'folder')][0] == 'failed / – / –'


def test_paper_numbers_are_the_papers():
    assert paper.PAPER[('table1 vgg16', 'cifar10')] == (.887, .888, .885)
    assert paper.PAPER[('table3 imgaug', 'mscoco')] == (.733, .785, .819)
    assert paper.PAPER[('table6 vit-b-32', 'nuswide')] == (.855, .856, .860)
    assert paper.PAPER[('table5 glove', 'flickr25k')] == (.870, .882, .887)
    assert paper.PAPER[('table1 cibhash', 'mscoco')] == (.737, .760, .775)
    assert ('table1 cibhash', 'flickr25k') not in paper.PAPER  # '-' in the paper's Table 1
    assert len(paper.PAPER) == 14 * 4 + 3 + 52  # Table 1's 16 other rows: 52 (row, dataset) with numbers
    assert paper.PAPER[('table1 *hhch', 'mscoco')] == (.805, .849, .853)
    assert paper.PAPER[('table1 harr', 'cifar10')] == (.520, .536, .575)
    assert ('table1 haman', 'cifar10') not in paper.PAPER and ('table1 *ddch', 'nuswide') not in paper.PAPER
    # every row of every table names a paper row that exists (or none; a row may lack a dataset, as CIBHash Flickr25k)
    for table in ('1', '2', '3', '5', '6', 'fig5a', 'fig5b', 'baselines'):
        for row in reproduce.table_rows(table):
            for d in paper.PAPER_DATASETS:
                key = row.paper.get(d) if isinstance(row.paper, dict) else row.paper
                assert key is None or key in {r for r, _ in paper.PAPER}, (table, row.id, key)


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


def test_table1_every_paper_row_measured_or_copied(settings):
    rows = {r.id: r for r in reproduce.table_rows('1')}
    assert list(rows) == ['cibhash', 'date', 'mecoq', 'dsch', 'nsh', 'cghash', 'ddch', 'haman', 'hihpq', 'harr', 'lgh',
                          'hhch', 'vgg16', 'vgg16-best', 'udbh-clip', 'ddch-clip', 'fsch-clip', 'hhch-clip', 'clip',
                          'best']  # the paper's order
    copied = {'date', 'dsch', 'nsh', 'ddch', 'haman', 'hihpq', 'harr', 'lgh', 'udbh-clip', 'ddch-clip', 'fsch-clip'}
    assert {i for i, r in rows.items() if r.settings is None} == copied
    cells = cells_of('1')
    assert {c.row.id for c in cells} == set(rows) - copied  # nothing of a copied row is trained
    cell = {(c.row.id, c.dataset, c.bits): c for c in cells}
    hhch = cell[('hhch', 'cifar10', 16)]
    assert 'EPOCHS' not in hhch.settings and (hhch.cfg['EPOCHS'], hhch.cfg['BATCH_SIZE']) == (80, 64)
    assert hhch.settings['BACKBONE'] == 'vgg16'
    assert cell[('hhch-clip', 'cifar10', 16)].settings['BACKBONE'] == 'ViT-B-16'
    assert cell[('cghash', 'cifar10', 16)].cfg['EPOCHS'] == 400 and cell[('mecoq', 'cifar10', 16)].cfg['EPOCHS'] == 50
    assert cell[('cibhash', 'cifar10', 16)].cfg['EPOCHS'] == 60  # a baseline: train.py's schedule
    shared = [c for c in cells_of('baselines') if c.row.id in ('cibhash-vgg16', 'hhch') and c.dataset == 'cifar10'
              and c.bits == 16]
    assert [c.cfg for c in shared] == [cell[('hhch-clip', 'cifar10', 16)].cfg, cell[('cibhash', 'cifar10', 16)].cfg]
    settings.setattr(reproduce, 'COMPETITOR_EPOCHS', 3)
    assert {c.cfg['EPOCHS'] for c in cells_of('1') if c.row.id in ('mecoq', 'hhch-clip')} == {3}
    table = reproduce.markdown_table('Table 1', '', reproduce.table_rows('1'), reproduce.DATASETS, reproduce.BITS,
                                     cells, 1)
    line = lambda rid, d: [p.strip() for p in [l for l in table if f'| {rid} | {d} |' in l][0].strip('|').split('|')]
    assert line('date', 'CIFAR-10')[3:] == ['copied: 0.577', 'copied: 0.629', 'copied: 0.647']
    assert line('haman', 'CIFAR-10')[3:] == ['–', '–', '–'] and 'copied' in line('haman', 'CIFAR-10')[0]
    assert line('mecoq', 'CIFAR-10')[3:] == ['not run / 0.629 / –', 'not run / 0.641 / –', 'not run / 0.651 / –']
    assert line('hhch-clip', 'CIFAR-10')[3] == 'not run / 0.881 / –'


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
                      f'--out_dir={tmp_path}/out', f'--cache_dir={tmp_path}/cache')
    lines = proc.stdout.splitlines()
    cmds = [l for l in lines if l.startswith('would run: ')]
    assert len(cmds) == 9 and all('--bits=16,64' in c for c in cmds)
    duheg = [c for c in cmds if '--method=duheg' in c]  # VGG-16 at 0.97 and best T2, CLIP at 0.97 and best T2
    assert len(duheg) == 4 and '--backbone=vgg16 --backbone_pretrained=imagenet --clip_model=ViT-B-16' in duheg[0]
    assert '--t2=0.97' in duheg[2] and '--t2=0.99' in duheg[3] and '--epochs=60' in duheg[3]
    # the competitors with a port: on VGG-16 features, *HHCH on CLIP; their authors' schedules (no --epochs)
    ours = {m: [c for c in cmds if f'--method={m} ' in c] for m in ('cibhash', 'mecoq', 'cghash', 'hhch')}
    assert [len(c) for c in ours.values()] == [1, 1, 1, 2] and '--epochs=60' in ours['cibhash'][0]
    assert not any('--epochs' in c for m in ('mecoq', 'cghash', 'hhch') for c in ours[m])
    assert '--backbone=vgg16' in ours['hhch'][0] and '--backbone=ViT-B-16' in ours['hhch'][1]
    # each run's rows, what it reads that is missing and the command that makes it
    plan = lines[lines.index(next(l for l in lines if l.startswith('to train: cifar10 seed 0, 16,64 bits: table 1 '
                                                                    'row vgg16 (DUH-EG, VGG-16, T2 = 0.97)'))):]
    assert plan[1].startswith(f'  features: missing ({tmp_path}/cache/cifar10/vgg16-imagenet/images.npy.json is '
                              f'missing); would run first: python dataset_extract.py --dataset=cifar10 '
                              f'--backbone=vgg16')
    assert plan[2].startswith(f'  features: missing ({tmp_path}/cache/cifar10/ViT-B-16-openai/images.npy.json')
    assert plan[3].startswith('  nouns: missing; would run first: python ') and '--vocab=wordnet' in plan[3]
    assert 'table 1 row best (DUH-EG, CLIP ViT-B/16, best T2 (Fig. 5b))' in proc.stdout
    assert 'table 1 row mecoq (MeCoQ' in proc.stdout and lines.count('  nouns: not needed') == 5
    # the estimate: two feature sets of CIFAR-10 (VGG-16 and ViT-B/16), WordNet's nouns, nine train.py runs
    assert 'dry run: 0 of 18 cells in' in proc.stdout and '9 train.py runs; first to extract: 2 feature set(s), ' \
        'to embed: 1 vocabularies' in proc.stdout
    import report
    e = report.estimate(report.GPU_RATES, {('cifar10', 'vgg16'): 120, ('cifar10', 'ViT-B-16'): 120},
                        {('wordnet', 'ViT-B-16'): 117798}, {k: ('cifar10', (16, 64), True) for k in 'abc'}, 60, 512)
    assert e['extract_s'] == pytest.approx(60000 / 2165.35 + 5000 * 120 / 2165.35 + 60000 / 2269.68
                                           + 5000 * 120 / 2269.68)  # each the GPU's pace: 8 workers decode faster
    own = report.estimate(report.GPU_RATES, {}, {}, {'a': ('cifar10', (16,), True, 80, 64)}, 60, 512)
    assert own['train_s'] == pytest.approx(report.process_s(report.GPU_RATES, 'cifar10', 1, True, 80, 64))
    assert own['train_s'] > report.estimate(report.GPU_RATES, {}, {}, {'a': ('cifar10', (16,), True)}, 60,
                                            512)['train_s']  # a competitor's own schedule (HHCH: 80 x 64) counts
    assert "estimated GPU time (an ESTIMATE by benchmarks/estimate_gpu_time.py's arithmetic for one RTX 4090 and 8 " \
        "CPU cores, not a measurement): extraction 10 min" in proc.stdout
    assert not os.path.exists(tmp_path / 'out') and not os.path.exists(tmp_path / 'cache')  # nothing written
