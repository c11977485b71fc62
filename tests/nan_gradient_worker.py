"""One process of the NaN-gradient test (tests/test_script.py runs it with python; not a test itself).

A tiny GPT-NeoX on one rank, one step whose loss is finite but one weight's gradient is NaN. Prints whether the
loss was finite, the step mark_non_finite records (inf: none), and whether the weight is still finite.

usage: python tests/nan_gradient_worker.py PRECISION
"""
import math
import sys

import torch

from worker import S, run_worker, start


def main():
    run, device = start("--model_name", "builtin:tiny", "--precision", sys.argv[1], "--seq_length", "32",
                        "--tp_size", "1", "--dp_size", "1", "--warmup_steps", "0")
    model = S.build_model(run.args, run.config, S.DTYPES[run.args.precision])
    engine = S.build_engine(model, run.args, run.layout, run.ds_config)
    weight = engine.module.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    weight.register_hook(lambda grad: grad * float("nan"))
    ids = torch.randint(0, 100, (2, 32), device=device)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    first_bad = S.mark_non_finite(torch.tensor(math.inf), 1, loss, S.applied_grad_norm(engine))
    print(math.isfinite(loss.item()), first_bad.item(), bool(torch.isfinite(weight).all()))


if __name__ == "__main__":
    run_worker(main)
