"""Text-encoding speed of Eq. 2: prompts per second of CLIP's text tower the plain way (every
prompt padded to 77 tokens, model.encode_text) against nouns_embed.embed_words (prompts sorted
by length, each batch cut after its longest end-of-text token), on the seven prompts of real
WordNet nouns, same model, same run, fastest of REPEATS alternating runs each. Both give t_w (Eq. 2); the largest
difference is printed.

    python benchmarks/bench_nouns.py
    python benchmarks/bench_nouns.py --clip_model=tiny-test --n_words=2000
"""
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nouns_embed  # noqa: E402
from configurator import configure  # noqa: E402
from models import load_clip, resolve_device  # noqa: E402

# model
CLIP_MODEL = 'ViT-B-16'     # text tower to time (compute does not depend on the weights)
CLIP_PRETRAINED = 'random'  # 'random' works offline; 'openai' for the real weights
# words
N_WORDS = 40                # WordNet nouns drawn at random, 7 prompts each
WORDS_SEED = 0              # seed of the draw
CACHE_DIR = 'cache'         # where nouns_embed keeps its WordNet copy
# system
BATCH_SIZE = nouns_embed.BATCH_SIZE  # prompts per batch, both ways; None: nouns_embed.py's default for the device
DEVICE = 'auto'             # 'auto', 'cpu', 'cuda'
THREADS = 0                 # torch CPU threads; 0 leaves torch's default
REPEATS = 2                 # timed runs of each way, alternating; the fastest of each is reported (as timeit does)


def main():
    configure(globals())
    if THREADS:
        torch.set_num_threads(THREADS)
    global BATCH_SIZE
    device = resolve_device(DEVICE)
    nouns_embed.BATCH_SIZE = BATCH_SIZE
    BATCH_SIZE = nouns_embed.batch_size_for(device)
    words = random.Random(WORDS_SEED).sample(nouns_embed.read_words('wordnet', CACHE_DIR)[0], N_WORDS)
    model, _, tokenizer = load_clip(CLIP_MODEL, CLIP_PRETRAINED, device)
    texts = nouns_embed.prompt_texts(words, nouns_embed.PROMPTS)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    with torch.no_grad():
        model.encode_text(tokenizer(texts[:8]).to(device))  # warm-up
        nouns_embed.embed_words(words[:2], model, tokenizer, BATCH_SIZE, device)
        sync()
    padded_s = cut_s = float('inf')
    for _ in range(REPEATS):
        t0 = time.time()
        with torch.no_grad():
            f = torch.cat([model.encode_text(tokenizer(texts[i:i + BATCH_SIZE]).to(device)).float()
                           for i in range(0, len(texts), BATCH_SIZE)])
        sync()
        padded_s = min(padded_s, time.time() - t0)
        t0 = time.time()
        cut = nouns_embed.embed_words(words, model, tokenizer, BATCH_SIZE, device)
        sync()
        cut_s = min(cut_s, time.time() - t0)
    padded = F.normalize(F.normalize(f, dim=-1).view(len(words), len(nouns_embed.PROMPTS), -1).mean(1), dim=-1)
    diff = float(np.abs(cut - padded.cpu().numpy()).max())
    n = len(texts)
    print(f"{CLIP_MODEL} on {device} ({torch.get_num_threads()} threads), {N_WORDS} WordNet nouns, {n} prompts: "
          f"padded {n / padded_s:.1f} prompts/s, cut {n / cut_s:.1f} prompts/s")
    print(f"bench_nouns model={CLIP_MODEL} device={device} prompts={n} batch={BATCH_SIZE} "
          f"padded_per_s={n / padded_s:.1f} cut_per_s={n / cut_s:.1f} ratio={padded_s / cut_s:.2f} max_diff={diff:.2e}")


if __name__ == '__main__':
    main()
