"""One process of the export test (tests/test_checkpoints.py launches it with torchrun; not a test itself).

Shards the tiny GPT-NeoX at tp=2 (the output head split by vocabulary, the default), trains a few steps
(so the weights are no longer their init), then calls the script's export_hf. Rank 0 saves the sharded
model's logits on a probe batch next to the export; the test reloads the export with plain transformers in a
fresh process and compares.

usage: torchrun --standalone --nproc_per_node 2 tests/export_worker.py HF_DIR LOGITS.pt
"""
import sys

import torch
import transformers
from tokenizers import Tokenizer, models

from worker import S, random_blocks, run_worker, start


def main():
    hf_dir, logits_path = sys.argv[1:3]
    run, device = start("--model_name", "builtin:tiny", "--precision", "fp32", "--seq_length", "32",
                        "--num_steps", "3", "--learning_rate", "1e-2", "--tp_size", "2", "--warmup_steps", "0")
    args, layout = run.args, run.layout
    dataset = random_blocks(16, args.seq_length, run.config.vocab_size, seed=2)
    engine = S.build_engine(S.build_model(args, run.config, torch.float32), args, layout, run.ds_config)
    batches = S.train_batches(dataset, layout, args.batch_size, args.global_batch_size, args.seed, device)
    for _ in range(args.num_steps):
        S.train_step(engine, batches)
    # Any tokenizer will do (the test is about the weights); a two-word one needs no training.
    vocab = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=vocab, eos_token="<|endoftext|>")
    S.export_hf(engine, tokenizer, layout, hf_dir)
    probe = dataset[:2]["input_ids"].to(device)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=probe).logits
        logits = S.gather_vocab_shards(logits) if args.vocab_parallel else logits  # the head is split by vocabulary
    if layout.rank == 0:
        torch.save({"input_ids": probe.cpu(), "logits": logits.cpu()}, logits_path)


if __name__ == "__main__":
    run_worker(main)
