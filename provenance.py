"""Where a result came from: the commit of this code (and whether tracked files differed from it) and
the machine it ran on (CPU and GPU, NVIDIA driver, torch, CUDA, Python). train.py records both in every
results line; reproduce.py's tables and report name them beside the cells.
"""
import os
import platform
import shutil
import subprocess

from models import hardware

_ROOT = os.path.dirname(os.path.abspath(__file__))


def git_commit(root=_ROOT):
    """'<short sha>' of the code in `root`, with ' (with uncommitted changes)' when a tracked file differs
    from it; 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return 'unknown'
    if out.returncode != 0:
        return 'unknown'
    return out.stdout.strip() + (' (with uncommitted changes)' if dirty else '')


def gpu_driver():
    """The NVIDIA driver's version (nvidia-smi), or None where there is none."""
    if not shutil.which('nvidia-smi'):
        return None
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.splitlines() or [''])[0].strip() or None if out.returncode == 0 else None


def machine(device=None):
    """The record of the machine a result was made on: hardware (models.hardware of `device`), the
    torch, CUDA and Python versions, and the NVIDIA driver (None without one)."""
    import torch
    return dict(hardware=hardware(device), torch=torch.__version__, cuda=torch.version.cuda, driver=gpu_driver(),
                python=platform.python_version())


def describe(m):
    """One line of a machine record: 'CPU ..., GPU; torch 2.4.1, CUDA 12.4, driver 550.54, Python 3.11'."""
    if not isinstance(m, dict):
        return 'not recorded'
    parts = [f"torch {m.get('torch')}", f"CUDA {m.get('cuda') or 'none'}"]
    parts += [f"driver {m['driver']}"] if m.get('driver') else []
    return f"{m.get('hardware', '?')}; " + ', '.join(parts + [f"Python {m.get('python')}"])
