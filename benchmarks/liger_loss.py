"""Fused linear cross-entropy for a transformers 5 GPTNeoXForCausalLM: the loss straight from the last hidden
states and lm_head.weight, chunk by chunk (Liger-Kernel), so the [tokens x vocabulary] logits, their fp32 copy
and their gradient are never held whole. Liger 0.8.5 has no apply_liger_kernel_to_gpt_neox; this replaces the
forward of one model instance (the blocks, compiled or not, are untouched: the loss runs eagerly after them).

  from liger_loss import use_fused_linear_ce
  use_fused_linear_ce(engine.module)         # after deepspeed.initialize (or on the plain model)
  loss = engine(input_ids=x, labels=x).loss  # with labels the output has no logits

Liger computes the gradients of the hidden states and of lm_head.weight during the forward (its backward only
scales them), in bf16 matmuls; softmax and loss in fp32; accum_dtype=float32 accumulates the lm_head gradient
over the chunks in fp32 (with None it would round to bf16 after every chunk). It syncs the host twice a step
(a .item() counting the targets, and a torch.equal on the incoming gradient).
"""
import types

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast


def liger_flce(hidden, weight, targets, ignore_index=-100):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index,
                                            accum_dtype=torch.float32)


def torch_flce(hidden, weight, targets, ignore_index=-100):
    """The same loss unfused (logits materialised, upcast to fp32): the reference for tests on a CPU."""
    return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=ignore_index)


def use_fused_linear_ce(model, loss_fn=liger_flce):
    """Make model(input_ids, labels=...) compute its loss with loss_fn(hidden [N, H], weight [V, H], targets [N])."""
    def forward(self, input_ids=None, labels=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                **kwargs):
        hidden = self.gpt_neox(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, **kwargs).last_hidden_state
        if labels is None:
            return CausalLMOutputWithPast(logits=self.lm_head(hidden))
        # as transformers' ForCausalLMLoss: position t predicts labels[t + 1]; the last position predicts nothing
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
        loss = loss_fn(hidden.reshape(-1, hidden.size(-1)), self.lm_head.weight, targets.reshape(-1))
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    return model


if __name__ == "__main__":  # CPU check of the wiring against the model's own loss (fp32, torch_flce)
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                        vocab_size=512, tie_word_embeddings=False, use_cache=False)
    model = GPTNeoXForCausalLM(cfg)
    ids = torch.randint(0, 512, (3, 32))
    ids[0, :5] = -100  # labels may carry ignored positions
    inputs = ids.clamp(min=0)
    ref = model(input_ids=inputs, labels=ids).loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = use_fused_linear_ce(model, torch_flce)(input_ids=inputs, labels=ids).loss
    loss.backward()
    grad_diff = max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), ref_grads))
    print(f"loss {ref.item():.6f} vs {loss.item():.6f}, max gradient difference {grad_diff:.2e}")
    assert abs(ref.item() - loss.item()) < 1e-5 and grad_diff < 1e-5
