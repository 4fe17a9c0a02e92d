"""Mixed-adapter batches: ``model(input_ids, adapter_names=[...])``, each sample through its own adapter in one
grouped native call, for inference (against per-adapter forwards and PEFT's mixed batches) and for training
(gradients reach each sample's adapter only, equal to separate per-adapter passes)."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers

import lispetorch as lt
from lispetorch.errors import ConfigError

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
NAMES = ["a", "b", "c"]


def base_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def with_adapters(tmp_path, ranks=(4, 2, 4), targets=("q_proj", "v_proj", "down_proj")):
    base = base_model()
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    for name, r in zip(NAMES, ranks, strict=True):
        one = copy.deepcopy(base)
        lt.inject(one, lt.LoraConfig(r=r, alpha=2 * r, target_modules=list(targets)))
        with torch.no_grad():
            for layer in lt.adapter_layers(one).values():
                layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g) * 0.2)
        lt.save_adapter(one, tmp_path / name)
        lt.load_adapter(model, tmp_path / name, adapter_name=name)
    return base, model


def test_outputs_equal_per_adapter_forwards_and_peft(tmp_path):
    base, model = with_adapters(tmp_path)
    ids = torch.randint(0, 64, (5, 9), generator=torch.Generator().manual_seed(2))
    names = ["a", "b", "__base__", "c", "a"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, n in enumerate(names):
            if n == "__base__":
                with lt.disabled(model):
                    expected = model(input_ids=ids[i:i + 1]).logits
            else:
                lt.set_adapter(model, n)
                expected = model(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], expected, rtol=1e-6, atol=1e-6)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    for n in NAMES[1:]:
        pm.load_adapter(tmp_path / n, adapter_name=n)
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(mixed, pm(input_ids=ids, adapter_names=names).logits, rtol=1e-5, atol=1e-5)


def test_training_gradients_reach_each_samples_adapter_only(tmp_path):
    # float64: the mixed batch and the per-adapter passes sum in other orders, so in float32 they agree to a few
    # rounding errors of the model's scale only; in float64 the comparison can be tight
    _, model = with_adapters(tmp_path)
    model.double()
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(3))
    names = ["a", "c", "a", "__base__"]
    model.train()
    lt.set_trainable_adapters(model, NAMES)
    params = {n: [p for layer in lt.adapter_layers(model).values() for p in (layer.lora_A[n], layer.lora_B[n])]
              for n in NAMES}
    out = model(input_ids=ids, adapter_names=names).logits
    # a loss that is a sum over samples, so the mixed gradient is the sum of per-sample ones
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (out * weights).sum().backward()
    mixed = {n: [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in ps]
             for n, ps in params.items()}
    model.zero_grad(set_to_none=True)
    for n in ("a", "c"):
        rows = [i for i, m in enumerate(names) if m == n]
        lt.set_adapter(model, n)
        lt.set_trainable_adapters(model, NAMES)
        (model(input_ids=ids[rows]).logits * weights[rows]).sum().backward()
        for mine, p in zip(mixed[n], params[n], strict=True):
            torch.testing.assert_close(mine, p.grad, rtol=1e-10, atol=1e-12)
        model.zero_grad(set_to_none=True)
    assert all(torch.count_nonzero(g) == 0 for g in mixed["b"])  # no sample used b
    assert all(torch.count_nonzero(g) > 0 for g in mixed["a"] + mixed["c"])


def test_dropout_in_a_mixed_batch_trains(tmp_path):
    base = base_model()
    model = copy.deepcopy(base)
    for n in ("a", "b"):
        lt.inject(model, lt.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj"]), adapter_name=n)
    model.train()
    lt.set_trainable_adapters(model, ["a", "b"])
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids, adapter_names=["a", "b"]).loss.backward()
    layer = lt.adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A["a"].grad is not None and layer.lora_A["b"].grad is not None


@pytest.mark.parametrize(("names", "word"), [(["a", "x", "a"], "'x'"), (["a", "b"], "2 names for a batch of 3"),
                                             ("a", "list of adapter names")])
def test_bad_adapter_names_are_refused_before_any_compute(tmp_path, names, word):
    _, model = with_adapters(tmp_path)
    ids = torch.randint(0, 64, (3, 9))
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match=word):
        model(input_ids=ids, adapter_names=names)
    handle.remove()
    assert not calls
    # the names held for one forward only: the next plain forward runs the active adapter
    assert all(layer.batch_adapters is None for layer in lt.adapter_layers(model).values())


def test_a_compiled_model_runs_mixed_batches_too(tmp_path):
    _, model = with_adapters(tmp_path)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for names in (["a", "b", "c"], ["c", "__base__", "a"]):
            expected = model(input_ids=ids, adapter_names=names).logits
            torch.testing.assert_close(compiled(input_ids=ids, adapter_names=names).logits, expected, rtol=1e-6,
                                       atol=1e-6)
        lt.set_adapter(model, "b")
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
