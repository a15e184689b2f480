"""The `--key=value` configurator every script shares (nanoGPT's configurator, with help and checks):
a script's settings are the plain UPPER_CASE constants at the top of its file; `configure` lets the
command line override any of them, type-checked, and `--help` lists them with the comments written
beside them. `check_ranges` and `check_choice` check values before any work.
"""
import os
import sys
import textwrap

def _parse_value(key, text, default):
    """Turn `text` into a value of the same type as `default`, or raise a clear error."""
    def fail(kind):
        raise SystemExit(f"error: --{key.lower()}={text!r} is not {kind} (the default is {default!r})")
    if isinstance(default, bool):
        low = text.lower()
        if low in ('1', 'true', 'yes', 'on'):
            return True
        if low in ('0', 'false', 'no', 'off'):
            return False
        fail('a boolean (true/false)')
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            fail('an integer')
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            fail('a number')
    if isinstance(default, (tuple, list)):
        parts = [p for p in text.split(',') if p != '']
        if default and not isinstance(default[0], str):
            try:
                return tuple(_parse_value(key, p, default[0]) for p in parts)
            except SystemExit as e:
                why = str(e).split('=', 1)[1].rsplit(' (the default', 1)[0]
                raise SystemExit(f"error: --{key.lower()}={text!r}: {why} (the default is "
                                 f"{','.join(map(str, default))})") from None
        return tuple(parts)
    if default is None:  # optional setting: a number, a path, a name or a boolean
        if text.lower() == 'none':
            return None
        if text.lower() in ('true', 'false'):
            return text.lower() == 'true'
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text
    return text


def _source(path):
    """(lines, {line: (column, text)} of every comment, top-level statements) of the file `path`."""
    import ast
    import io
    import tokenize
    with open(path, encoding='utf-8') as f:
        src = f.read()
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip('#').strip())
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    return src.split('\n'), comments, ast.parse(src).body


def _public_names(s):
    """The public UPPER_CASE names a top-level statement assigns (NAME = ..., A = B = ...), unless
    it assigns a table (a dict or a set: data, not a setting)."""
    import ast
    if not isinstance(s, (ast.Assign, ast.AnnAssign)):
        return []
    table = isinstance(s.value, (ast.Dict, ast.DictComp, ast.Set, ast.SetComp)) or (
        isinstance(s.value, ast.Call) and getattr(s.value.func, 'id', '') in ('dict', 'set', 'frozenset'))
    targets = s.targets if isinstance(s, ast.Assign) else [s.target]
    names = [t.id for t in targets if isinstance(t, ast.Name)]
    return [] if table else [n for n in names if n.isupper() and not n.startswith('_')]


def _first_def(body):
    import ast
    return next((s.lineno for s in body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))),
                float('inf'))


def settings_doc(path):
    """The settings block of the script `path`, read from its source: a list of (group, NAME,
    comment). The block is every top-level public UPPER_CASE assignment of a plain type (number,
    string, boolean, tuple, None) above the script's first function or class; names starting with
    `_` and tables (dicts, sets) are not settings. A comment line at column 0 starts
    a group (`# data`; `# ----` rules are skipped), an indented comment line right below a setting
    continues its comment. This one reading feeds --help and the command-line keys;
    `unreachable_settings` reports a constant it would miss, when the script starts."""
    lines, comments, body = _source(path)

    def header(n):  # the group a run of column-0 comment lines ending at line n names, or None
        run = []
        while n in comments and comments[n][0] == 0 and lines[n - 1].lstrip().startswith('#'):
            if comments[n][1].strip('-=# '):
                run.insert(0, comments[n][1])
            n -= 1
        return ' '.join(run) or None

    out, group, first_def = [], '', _first_def(body)
    for s, nxt in zip(body, body[1:] + [None]):
        names = _public_names(s)
        if s.lineno > first_def or not names:
            continue
        group = header(s.lineno - 1) or group
        end_comment = comments.get(s.end_lineno)
        comment = end_comment[1] if end_comment and end_comment[0] > 0 else ''
        for n in range(s.end_lineno + 1, nxt.lineno if nxt else len(lines) + 1):  # indented comment lines below
            if n not in comments or comments[n][0] == 0 or not lines[n - 1].lstrip().startswith('#'):
                break
            comment += ' ' + comments[n][1]
        out += [(group, n, comment.strip()) for n in names]
    return out


def unreachable_settings(path, g):
    """Constants of the script `path` that look like settings but that --key=value cannot set: a
    public UPPER_CASE constant of a plain type below the first function (settings_doc), each as
    'file:line: NAME ...'. (A table, a dict or a set, is data, never a setting.)"""
    lines, comments, body = _source(path)
    first_def, out = _first_def(body), []
    for s in body:
        for name in _public_names(s):
            plain = isinstance(g.get(name), _SETTING_TYPES)
            if s.lineno > first_def and plain:
                out.append(f"{path}:{s.lineno}: {name} is below the first function, where --key=value cannot set "
                           f"it: move it up into the settings, or name it _{name}")
    return out


_SETTING_TYPES = (int, float, str, bool, tuple, list, type(None))


def _setting_rows(g):
    """[(group, NAME, comment)] of the settings of the script whose globals are `g`: its settings
    block (settings_doc) when `g` comes from a file, else every UPPER_CASE constant; those of a plain
    type only."""
    path = g.get('__file__')
    rows = settings_doc(path) if path and str(path).endswith('.py') and os.path.isfile(path) \
        else [('', k, '') for k in g if k.isupper() and not k.startswith('_')]
    return [r for r in rows if r[1] in g and isinstance(g[r[1]], _SETTING_TYPES)]


def _setting_keys(g):
    """{lower-case key: NAME} of a script's settings (_setting_rows)."""
    return {n.lower(): n for _, n, _ in _setting_rows(g)}


def cli_value(v):
    """A setting's value as it is typed after --key= (tuples comma-separated, '' for empty)."""
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if v is None:
        return 'none'
    if isinstance(v, (tuple, list)):
        return ','.join(map(str, v)) or "''"
    return str(v) if v != '' else "''"


def help_text(g):
    """--help of a script: usage, the first paragraph of its docstring, then its settings in
    the file's groups, each as --key=default and the comment written beside the constant."""
    script = os.path.basename(g.get('__file__') or 'script.py')
    doc = (g.get('__doc__') or '').strip().split('\n\n')[0]
    out = [f"usage: python {script} [--key=value ...]", '', doc, '',
           "Settings (the constants at the top of the file; --flag alone sets a boolean to true):"]
    rows = _setting_rows(g)
    width = min(max((len(f"--{n.lower()}={cli_value(g[n])}") for _, n, _ in rows), default=0), 38)
    group = None
    for grp, name, comment in rows:
        if grp != group:
            out += [''] + textwrap.wrap(f"{grp}:" if grp else 'settings:', 100)
            group = grp
        arg = f"--{name.lower()}={cli_value(g[name])}"
        text = textwrap.wrap(comment, max(40, 100 - width - 4), break_on_hyphens=False, break_long_words=False) or ['']
        lines = [f"  {arg:<{width}}  {text[0]}"] if len(arg) <= width else [f"  {arg}", f"  {'':<{width}}  {text[0]}"]
        out += [s.rstrip() for s in lines] + [f"  {'':<{width}}  {t}" for t in text[1:]]
    return '\n'.join(out).rstrip() + '\n'


def released_defaults(settings, table):
    """The settings a script's RELEASED_DEFAULTS `table` names ({NAME: (default, the authors' released
    code's)}) resolved, in a script's globals or a run's config: a None (or '') value takes the
    default of its column, chosen by settings['RELEASED']. Returns {NAME: value}."""
    released = bool(settings.get('RELEASED'))
    return {k: v[released] if settings.get(k) in (None, '') else settings[k] for k, v in table.items()}


def check_ranges(g, ranges):
    """Every numeric setting of a script inside its interval, before any work: `ranges` maps a NAME
    to '(lo, hi)', '[lo, hi]' or a mix ('inf' allowed); None values pass (they mean a default), a
    tuple setting is checked item by item and may not repeat an item. The error names the setting,
    its value, its range and its meaning (the comment beside the constant)."""
    path = g.get('__file__')
    meaning = {n: c for _, n, c in settings_doc(path)} if path and os.path.isfile(path) else {}
    for name, spec in ranges.items():
        lo, hi = (float(x) for x in spec[1:-1].split(','))
        values = tuple(g[name]) if isinstance(g[name], (tuple, list)) else (g[name],)
        why = f" ({meaning[name]})" if meaning.get(name) else ''
        for v in values:
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise SystemExit(f"error: --{name.lower()}={cli_value(g[name])}: {v!r} is not a number{why}")
            if not ((v > lo if spec[0] == '(' else v >= lo) and (v < hi if spec[-1] == ')' else v <= hi)):
                raise SystemExit(f"error: --{name.lower()}={cli_value(g[name])}: {v} is outside {spec}{why}")
        if len(set(values)) < len(values):
            twice = sorted({v for v in values if values.count(v) > 1})
            raise SystemExit(f"error: --{name.lower()}={cli_value(g[name])} repeats {', '.join(map(str, twice))}{why}")


def configure(g, argv=None):
    """Override the settings of a script (the UPPER_CASE constants of its settings block, in
    its globals `g`) from `--key=value` arguments (case-insensitive; `--flag` alone sets a
    boolean to True); --help or -h prints them and exits. Unknown keys (with the nearest known
    one) and values of the wrong type are errors. Returns the full configuration as a dict."""
    import difflib
    argv = sys.argv[1:] if argv is None else argv
    path = g.get('__file__')
    unreachable = unreachable_settings(path, g) if path and str(path).endswith('.py') and os.path.isfile(path) else []
    if unreachable:
        raise SystemExit('error: ' + '\n       '.join(unreachable))
    keys = _setting_keys(g)
    if '--help' in argv or '-h' in argv:
        print(help_text(g), end='')
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith('--'):
            raise SystemExit(f"error: arguments look like --key=value, got {arg!r} (--help lists the settings)")
        key, eq, text = arg[2:].partition('=')
        key = key.replace('-', '_').lower()
        if key not in keys:
            near = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.5)
            raise SystemExit(f"error: unknown setting --{key}" + (f"; did you mean --{near[0]}?" if near else '')
                             + " (--help lists every setting with its default and meaning)")
        name = keys[key]
        if not eq:
            if not isinstance(g[name], bool):
                raise SystemExit(f"error: --{key} needs a value (--{key}=...)")
            text = 'true'
        g[name] = _parse_value(name, text, g[name])
    return {keys[k]: g[keys[k]] for k in sorted(keys)}


def given_settings(argv=None):
    """The NAMEs of the settings typed as --key=value in `argv` (default: the command line), where a default that
    depends on another setting gives way only to a value typed."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].partition('=')[0].replace('-', '_').upper() for a in argv if a.startswith('--')}


def choice_error(key, value, choices):
    """The words of a setting outside its choices: '--key='value': choose one of a, b, c'."""
    return f"--{key}={value!r}: choose one of {', '.join(map(str, choices))}"


def check_choice(key, value, choices):
    """Stop the script with one line when the setting --key is not one of `choices`."""
    if value not in choices:
        raise SystemExit('error: ' + choice_error(key, value, choices))
