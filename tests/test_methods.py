"""Every baseline of train.py --method trained through the command line on a generated feature
set: each ends above chance, and the supervised ones (which read labels) above the label-free."""
import re

import pytest

from conftest import run_script, write_feature_set


def test_baselines_above_chance_supervised_above_label_free(tmp_path):
    labels, (query, retrieval, _) = write_feature_set(str(tmp_path))
    chance = ((labels[query] @ labels[retrieval].T) > 0).mean()
    assert chance == pytest.approx(1 / 8)
    maps = {}
    for method in ('lsh', 'itq', 'ssdh', 'dhn', 'dch'):
        proc = run_script('train.py', '--dataset=folder', f'--cache_dir={tmp_path}', '--backbone=tiny-test',
                          '--backbone_pretrained=random', f'--method={method}', '--bits=16', '--epochs=40',
                          '--warmup=3', '--lr_max=0.01', '--lr_min=0.001', '--batch_size=64',
                          f'--results={tmp_path}/results.jsonl', f'--run_dir={tmp_path}/{method}',
                          env=dict(OMP_NUM_THREADS='1'))
        maps[method] = float(re.search(rf'^result dataset=folder method={method} bits=16 map@1000=([\d.]+)',
                                       proc.stdout, re.M).group(1))
        if method in ('dhn', 'dch'):
            assert 'supervised' in proc.stdout
    for method, m in maps.items():
        assert m > chance + 0.1, maps
    assert min(maps['dhn'], maps['dch']) > max(maps['lsh'], maps['itq'], maps['ssdh']) + 0.1, maps
