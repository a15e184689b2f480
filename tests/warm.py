"""A warm interpreter for the tests' script runs (conftest.run_script): it imports the heavy libraries once
(torch, torchvision, open_clip: about 6 s of every `python script.py` on a 2-core machine) and forks a child per
run, which runs the script as `python script.py args` would: fresh project modules (none is imported here),
sys.argv, sys.path[0] the script's folder, the working directory and environment, stdin from /dev/null, stdout
and stderr to the files it is given, the exit status of SystemExit or 1 with the traceback. conftest sends it
only runs in the tests' own environment (a library may read a variable when it is imported); the rest start a
fresh python.

Protocol on stdin / stdout: a pickled job dict in, the child's pid out, then its exit status."""
import importlib
import os
import pickle
import runpy
import struct
import sys
import threading
import traceback


def send(f, obj):
    data = pickle.dumps(obj)
    f.write(struct.pack('<Q', len(data)) + data)
    f.flush()


def _exactly(f, n):
    data = b''
    while len(data) < n:
        part = f.read(n - len(data))
        if not part:
            return None
        data += part
    return data


def receive(f):
    head = _exactly(f, 8)
    return None if head is None else pickle.loads(_exactly(f, struct.unpack('<Q', head)[0]))


def child(script, args, cwd, env, stdout, stderr):
    """Run `script` as __main__ in this forked process and leave with its exit status (never returns)."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, stdout), (2, stderr)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [script, *args]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        try:
            runpy.run_path(script, run_name='__main__')
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        for t in threading.enumerate():  # as the interpreter does at exit: wait for non-daemon threads
            if t is not threading.main_thread() and not t.daemon:
                t.join()
        import atexit
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve():
    for name in ('numpy', 'PIL.Image', 'sklearn.cluster', 'tqdm', 'open_clip'):  # open_clip: torch, torchvision, timm
        importlib.import_module(name)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        job = receive(inp)
        if job is None:
            return
        pid = os.fork()
        if pid == 0:
            child(**job)
        send(out, pid)
        send(out, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))


if __name__ == '__main__':
    serve()
