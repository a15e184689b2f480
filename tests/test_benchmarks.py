"""Every benchmark runs at a tiny size through its command line, with its default settings
otherwise, and its own agreement checks hold. (Speed itself is never asserted in tests.)"""
import re

import pytest

from conftest import run_script


def result(proc, name):
    line = [l for l in proc.stdout.splitlines() if l.startswith(name + ' ')][-1]
    return dict(re.findall(r'(\w+)=(\S+)', line))


def test_bench_eval_fast_path_agrees_with_the_loop():
    # the torch path (--device) dry-runs on the CPU; the floor is timed beside the fast path
    r = result(run_script('benchmarks/bench_eval.py', '--num_query=60', '--num_retrieval=3000', '--topk=500',
                          '--baseline_queries=20', '--rounds=2', '--device=cpu'), 'bench_eval')
    assert r['ok'] == 'True' and float(r['max_abs_diff']) == 0.0 and float(r['fast_s']) > 0
    assert float(r['floor_s']) > 0 and float(r['floor_ratio']) > 0 and float(r['device_s']) > 0
    assert float(r['peak_mib']) > 0


def test_bench_extract_default_workers_and_agreement():
    # NUM_WORKERS keeps dataset_extract.py's default (-1: one per core)
    r = result(run_script('benchmarks/bench_extract.py', '--backbone=tiny-test', '--n_images=8', '--batch_size=4',
                          '--rounds=1', '--views=3', '--full_views=6', '--full_images=10'), 'bench_extract')
    assert r['ok'] == 'True' and float(r['max_abs_diff']) == 0.0  # either path's plain view is the bare forward's input
    assert float(r['cos_aug']) >= 0.999  # the tensor path's augmented features are the PIL path's
    assert int(r['workers']) >= 1 and r['views'] == '3' and r['full_views'] == '6' and r['full_images'] == '10'
    for k in ('aug_ratio', 'aug_vs_pil', 'plain_ratio', 'plain_vs_pil', 'full_ratio'):  # every figure is reported
        assert float(r[k]) > 0, k
    assert r['views_on'] == 'workers' and r['peak_gpu_gb'] == 'nan'  # the CPU's default; no GPU here


def test_bench_extract_peak_memory_on_the_devices_code_path():
    r = result(run_script('benchmarks/bench_extract.py', '--backbone=tiny-test', '--n_images=6', '--peak',
                          '--views_on=device', '--full_views=5', '--full_images=3', '--num_workers=1'),
               'bench_extract_peak')
    assert r['views_on'] == 'device' and float(r['peak_mb']) >= float(r['base_mb']) > 0
    assert float(r['worker_peak_mb']) > 0 and r['images'] == '6' and r['full_views'] == '5'


def test_bench_train_reports_epochs_overhead_and_eval():
    r = result(run_script('benchmarks/bench_train.py', '--n_train=64', '--batch_size=16', '--timed_epochs=2',
                          '--rounds=1', '--bits=8', '--num_query=20', '--num_retrieval=200', '--topk=50',
                          '--overhead_steps=20', '--threads=1'), 'bench_train')
    assert (r['n_train'], r['batch'], r['timed_epochs'], r['extrapolated']) == ('64', '16', '2', 'True')
    # the 60-epoch time is the setup plus 60 x the median epoch, so at least 60 x it; the total adds the evaluation
    s, train_s, epochs = float(r['s_per_epoch']), float(r['train_s']), int(r['epochs'])
    assert epochs == 60 and s > 0 and epochs * s - 0.1 <= train_s  # (printed to 0.1 s and 1 ms)
    parts = train_s + sum(float(r[k]) for k in ('encode_s', 'map_s', 'map_cont_s'))
    assert abs(float(r["total_s"]) - parts) <= 0.15 and float(r['step_overhead_ms']) > 0


def test_bench_nouns_cut_batches_agree(tmp_path):
    r = result(run_script('benchmarks/bench_nouns.py', '--clip_model=tiny-test', '--n_words=20',
                          f'--cache_dir={tmp_path}'), 'bench_nouns')
    assert int(r['prompts']) == 140 and float(r['max_diff']) < 1e-5 and float(r['cut_per_s']) > 0


def test_bench_kmeans_close_to_sklearn():
    r = result(run_script('benchmarks/bench_kmeans.py', '--n=3000', '--dim=32', '--topics=10', '--leaves=5',
                          '--n_k=20'), 'bench_kmeans')
    assert abs(float(r['mean_cos']) - float(r['sklearn_mean_cos'])) < 0.02


def test_bench_search_agrees_and_reports_recall():
    # the benchmark itself asserts that the exact search finds faiss's distances at every rank
    r = result(run_script('benchmarks/bench_search.py', '--num_codes=20000', '--num_query=200',
                          '--rounds=1', '--classes=100'), 'bench_search')
    assert float(r['ours_qps']) > 0 and float(r['faiss_flat_qps']) > 0
    assert 0.5 < float(r['ivf_recall']) <= 1 and 0.5 < float(r['hnsw_recall']) <= 1


def test_bench_aqd_agrees_with_faiss_index_pq():
    r = result(run_script('benchmarks/bench_aqd.py', '--num_query=200', '--num_retrieval=5000', '--topk=100',
                          '--rounds=1'), 'bench_aqd')
    assert r['ok'] == 'True' and float(r['max_abs_diff']) <= 1e-4 and float(r['ours_s']) > 0


def test_bench_competitors_projects_each_schedule_and_its_ratio():
    r = result(run_script('benchmarks/bench_competitors.py', '--n_train=200', '--dim=16', '--e_dim=8',
                          '--timed_epochs=2', '--rounds=1'), 'bench_competitors')
    assert (r['n_train'], r['timed_epochs'], r['rounds']) == ('200', '2', '1')
    # the whole schedule is setup + first epoch + the others x the median epoch: at least (epochs - 1) x it
    for method, epochs in (('duheg', 60), ('hhch', 80), ('mecoq', 50)):
        s, full = float(r[f'{method}_s_per_epoch']), float(r[f'{method}_full_s'])
        assert s > 0 and (epochs - 1) * s - 0.1 <= full, method
        assert float(r[f'{method}_vs_duheg']) == pytest.approx(full / float(r['duheg_full_s']), rel=0.1)
    assert float(r['cghash_full_s']) > 0 and r['duheg_vs_duheg'] == '1.000'


def test_bench_report_same_document_and_every_cell():
    r = result(run_script('benchmarks/bench_report.py', '--seeds=1', '--rounds=1', '--num_query=20',
                          '--num_retrieval=200'), 'bench_report')
    # every cell of --table=all on four datasets, the shared ones one results line; the figures' 64-bit runs
    assert r['same'] == 'True' and int(r['cells']) > int(r['results']) > 300 and int(r['codes']) > 40
    assert float(r['first_s']) > float(r['figures_s']) > 0 and float(r['cached_s']) > 0
