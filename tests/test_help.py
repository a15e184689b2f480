"""--help and -h on every script: purpose, settings grouped as in the file, defaults, comments."""
import glob
import io
import os
import runpy
import textwrap
from contextlib import redirect_stdout

import pytest

import configurator
from conftest import ROOT, run_script

SCRIPTS = ['dataset_extract.py', 'nouns_embed.py', 'train.py', 'eval_hash.py', 'reproduce.py', 'search.py'] + \
    sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'benchmarks', '*.py')))


def _values(script):
    return runpy.run_path(os.path.join(ROOT, script), run_name='settings')


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_lists_every_setting_with_its_default_and_comment(script):
    proc = run_script(script, '--help')
    assert proc.returncode == 0 and proc.stderr.count('Traceback') == 0
    out = proc.stdout
    assert out.startswith(f'usage: python {os.path.basename(script)} [--key=value ...]')
    g = _values(script)
    purpose = g['__doc__'].strip().split('\n\n')[0]
    assert ' '.join(purpose.split()) in ' '.join(out.split())          # the docstring's first paragraph
    doc = configurator.settings_doc(os.path.join(ROOT, script))
    assert len(doc) >= 8
    flat = ' '.join(out.split())
    for group, name, comment in doc:
        assert f'--{name.lower()}={configurator.cli_value(g[name])}' in out, name  # every setting with its default
        assert ' '.join(comment.split()) in flat, name                     # and its comment
        assert f"{' '.join(group.split())}:" in flat if group else True
    # -h prints the same, here through configure itself on the script's own globals
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as e:
        configurator.configure(g, ['-h'])
    assert e.value.code == 0 and buf.getvalue() == out


def test_minus_h_exits_zero_from_the_command_line():
    proc = run_script('nouns_embed.py', '-h')
    assert proc.returncode == 0 and '--t1=0.9' in proc.stdout and 'Eq. 3' in proc.stdout


@pytest.mark.parametrize('script,typo,near', [('train.py', '--t3=0.9', '--t2'),
                                              ('nouns_embed.py', '--n_kk=10', '--n_k'),
                                              ('dataset_extract.py', '--bakbone=vgg16', '--backbone')])
def test_misspelt_key_names_the_closest_setting(script, typo, near):
    proc = run_script(script, typo, check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert f'unknown setting {typo.split("=")[0]}; did you mean {near}?' in proc.stderr


def test_settings_doc_reads_groups_continuations_and_every_constant_above_the_first_function(tmp_path):
    src = textwrap.dedent('''\
        """Doc."""
        import os

        # -----------------------------------------------------------------------------
        # data
        A = 1            # the a
        B = (1, 2)       # the b,
                         # continued
        _HIDDEN = 3      # not a setting
        # a group over
        # two lines
        C = 'x'
        D = E = None     # two names

        F = 2            # after a blank line: still a setting
        TABLE = {'a': 1}  # a table: data, not a setting
        ''')
    path = tmp_path / 'script.py'
    path.write_text(src)
    assert configurator.settings_doc(str(path)) == [
        ('data', 'A', 'the a'), ('data', 'B', 'the b, continued'),
        ('a group over two lines', 'C', ''), ('a group over two lines', 'D', 'two names'),
        ('a group over two lines', 'E', 'two names'),
        ('a group over two lines', 'F', 'after a blank line: still a setting')]
    g = dict(__file__=str(path), A=1, B=(1, 2), _HIDDEN=3, C='x', D=None, E=None, F=2, TABLE={'a': 1})
    assert configurator.configure(g, ['--b=3,4', '--f=3'])['F'] == 3 and g['B'] == (3, 4)
    with pytest.raises(SystemExit, match='unknown setting --table'):
        configurator.configure(g, ['--table=1'])
    # a plain constant below the first function cannot be set: the script refuses to start, naming it
    path.write_text(src + 'def f():\n    pass\n\n\nLATE = 4\n')
    with pytest.raises(SystemExit) as e:
        configurator.configure(dict(g, LATE=4), [])
    assert str(e.value) == (f"error: {path}:21: LATE is below the first function, where --key=value cannot set it: "
                            f"move it up into the settings, or name it _LATE")


@pytest.mark.parametrize('script, settings', [
    ('dataset_extract.py', ('BACKBONE', 'BACKBONE_PRETRAINED', 'CLIP_MODEL', 'CLIP_PRETRAINED')),
    ('nouns_embed.py', ('CLIP_MODEL', 'CLIP_PRETRAINED')),
    ('train.py', ('BACKBONE', 'BACKBONE_PRETRAINED', 'CLIP_MODEL', 'CLIP_PRETRAINED')),
    ('reproduce.py', ('CLIP_MODEL', 'CLIP_PRETRAINED'))])
def test_help_lists_the_tiny_model_and_random_weights(script, settings):
    """Where --help lists the backbones and their weights, the tiny CLIP and random weights are among them."""
    meaning = {n: c for _, n, c in configurator.settings_doc(os.path.join(ROOT, script))}
    for name in settings:
        assert ('tiny-test' if not name.endswith('PRETRAINED') else "'random'") in meaning[name], (script, name)
