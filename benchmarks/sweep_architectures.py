"""Every causal-LM architecture of transformers, adapted by lispetorch and by PEFT, checked against each other.

For each model type in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny model is built from its default
config (2 layers, hidden 64, 4 heads, vocabulary 256, small experts and state sizes; sub-configs shrunk the same
way), in float32 from a fixed seed, saved and loaded back through ``save_pretrained`` / ``from_pretrained``. Types
whose tiny model cannot be built or cannot run a forward on token ids alone are counted and skipped. Each type
runs in a process of its own (forked from this one) with a time limit.

Three target sets: ``"all-linear"``, the attention projections (the leaf names of the adaptable layers under a
module whose name says attention) and, on mixture-of-experts models whose experts are fused 3-D parameters,
``"experts"``: the attention projections and every expert weight (``target_parameters``, one adapter per
expert). For each, with rank 4, alpha 8:

1. ``select``: lispetorch adapts the same modules as PEFT, with the same number of trainable parameters. Where
   lispetorch leaves out of ``all-linear`` a linear layer with a forward of its own (a router returning a tuple),
   PEFT adapts it and breaks at the forward; the check passes when that is the only difference, and PEFT is given
   the same selection for the checks that follow.
2. ``to_peft``: lispetorch's adapter (random factors) saved with ``save_adapter`` loads in
   ``peft.PeftModel.from_pretrained`` with logits within 1e-5.
3. ``from_peft``: PEFT's adapter (``init_lora_weights=False``) saved by PEFT loads with ``load_adapter``, logits
   within 1e-5.
4. ``merge``: merge then unmerge gives the base weights back bit for bit, without a warning, and the merged
   logits are the unmerged ones (within 1e-4).
5. ``train``: one backward pass reaches the adapter factors only, with gradients equal to PEFT's on the same
   adapter (relative 1e-4).

    python benchmarks/sweep_architectures.py                    # all types, table on stdout
    python benchmarks/sweep_architectures.py llama gpt2 ctrl    # some types
    python benchmarks/sweep_architectures.py --markdown out.md --timeout 300
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

import lispetorch as lt  # noqa: E402

CHECKS = ("select", "to_peft", "from_peft", "merge", "train")
TARGET_SETS = ("all-linear", "attention", "experts")
RANK, ALPHA = 4, 8
LOGITS_TOL = 1e-5
MOE = ("fused MoE experts: PEFT's all-linear on this type also adapts the experts and the router weight (its "
       "rewrite of transformers-v4 targets, gate_up_proj at twice the rank); lispetorch's all-linear adapts the linear "
       "layers, the experts when target_parameters names them (the experts column)")
# PEFT rewrites the targets gate_proj / up_proj / down_proj of these model types into the fused experts'
# target_parameters (its transformers-v5 MoE conversion), so it cannot adapt dense layers of those names
PEFT_MOE = "PEFT rewrites gate_proj/up_proj/down_proj targets into expert parameters on this MoE type"
PEFT_MOE_REWRITE = set(getattr(importlib.import_module("peft.utils.transformers_weight_conversion"),
                               "_MODEL_TO_CONVERSION_PATTERN", {}))

# --- tiny configs ------------------------------------------------------------------------------------------------
LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers", "decoder_layers",
          "encoder_layers", "num_encoder_layers")
SIZES = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "n_embed"), 64),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim",
                     "ffn_hidden_size", "d_ff", "d_inner", "inner_hidden_size"), 128),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"), 2),
    "head_dim": 16, "kv_channels": 16, "attention_head_dim": 16,
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k", "moe_k"), 2),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                     "moe_ffn_hidden_size"), 32),
    **dict.fromkeys(("q_lora_rank",), 32), **dict.fromkeys(("kv_lora_rank",), 16),
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "vocab_size": 256,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "conv_kernel": 4,
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "mask_token_id",
             "decoder_start_token_id", "unk_token_id", "image_token_id", "image_token_index", "boi_token_id",
             "eoi_token_id", "video_token_id", "audio_token_id")


def shrink(config, depth: int = 0) -> None:
    """Makes ``config`` (and its sub-configs) tiny in place."""
    layers = 2
    for key in LAYERS:
        old = getattr(config, key, None)
        if isinstance(old, int) and not isinstance(old, bool) and old > layers:
            setattr(config, key, layers)
            for list_key, value in list(vars(config).items()):  # per-layer lists (layer types, block kinds)
                if (isinstance(value, (list, tuple)) or (isinstance(value, str) and "pattern" in list_key)) and \
                        len(value) == old and list_key not in LAYERS:
                    setattr(config, list_key, value[:layers])
    for key, value in SIZES.items():
        old = getattr(config, key, None)
        if isinstance(old, int) and not isinstance(old, bool) and old > value:
            try:
                setattr(config, key, value)
            except Exception:  # a computed property
                pass
    vocab = getattr(config, "vocab_size", None)
    for key in TOKEN_IDS:
        value = getattr(config, key, None)
        if isinstance(vocab, int) and isinstance(value, int) and value >= vocab:
            setattr(config, key, vocab - 1 - TOKEN_IDS.index(key))
    for name in ("intermediate_size", "n_inner"):
        if isinstance(getattr(config, name, None), list):
            setattr(config, name, [128] * len(getattr(config, name)))
    # rotary sizes within the (shrunk) head size; MLA's rotary head size is its head_dim
    if isinstance(getattr(config, "rotary_dim", None), int) and config.rotary_dim > 8:
        config.rotary_dim = 8
    if isinstance(getattr(config, "qk_rope_head_dim", None), int) and isinstance(getattr(config, "head_dim", None),
                                                                                  int):
        config.head_dim = config.qk_rope_head_dim
    if getattr(config, "num_experts_per_tok", 0) is None and getattr(config, "n_routed_experts", None):
        config.num_experts_per_tok = 2
    # state-space heads: heads × head size = expand × hidden
    hidden = getattr(config, "hidden_size", None)
    for heads, head_dim, expand in (("mamba_n_heads", "mamba_d_head", "mamba_expand"),
                                    ("num_heads", "head_dim", "expand")):
        if all(isinstance(getattr(config, k, None), int) for k in (heads, head_dim, expand)) and \
                isinstance(hidden, int):
            setattr(config, head_dim, getattr(config, expand) * hidden // getattr(config, heads))
    if depth < 2:
        for value in vars(config).values():
            if isinstance(value, transformers.PretrainedConfig):
                shrink(value, depth + 1)


def load(directory) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def build(model_type: str, directory: Path):
    """A tiny float32 model of ``model_type`` and token ids ``(2, 8)`` it runs on: built from the config, saved
    with ``save_pretrained`` into ``directory`` and loaded back with ``from_pretrained`` (the path a user's model
    takes, where transformers may load fused checkpoint weights as views of one storage, which ``copy.deepcopy``
    would not keep: every model compared is loaded afresh)."""
    config = AutoConfig.for_model(model_type)
    shrink(config)
    config.use_cache = False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    model = load(directory)
    vocab = model.get_input_embeddings().weight.shape[0] if model.get_input_embeddings() is not None else 256
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab, 200), (2, 8), generator=g)
    with torch.no_grad():
        logits(model, ids)
    return model, ids


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


# --- the checks ----------------------------------------------------------------------------------------------------
def attention_targets(model) -> list[str]:
    """Leaf names of the adaptable layers under a module whose name says attention (none: not applicable)."""
    leaves = set()
    for name in lt.targets.adaptable_modules(model):
        parent, _, leaf = name.rpartition(".")
        if re.search(r"attn|attention", parent, re.I) and not leaf.isdigit():
            leaves.add(leaf)
    return sorted(leaves)


def model_type_of(model) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def submodule(model, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model


def peft_adapted(model) -> dict[str, torch.nn.Module]:
    import peft

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def adapter_grads(model, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            key = n.removeprefix(prefix).removesuffix(".weight")
            out[key] = p.grad
    return out


def loss_of(model, ids):
    out = logits(model, ids)
    return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lt.adapter_layers(model).values():
            for p in layer.lora_B.values():
                for q in (p.values() if isinstance(p, torch.nn.ParameterDict) else [p]):  # an expert adapter's
                    q.copy_(torch.randn(q.shape, generator=g) * 0.1)


def expert_weights(model) -> list[str]:
    """The fused expert weights lispetorch can adapt, for ``target_parameters``: the shortest names that select
    them and nothing else (``down_proj``, or ``experts.down_proj`` beside a shared expert's 3-D ``down_proj``)."""
    names = [k for k in lt.experts.adaptable_expert_weights(model) if model.get_parameter(k).dim() == 3]
    return lt.experts.parameter_targets(names, model) if names else []


def in_peft_layout(model, grads: dict) -> dict:
    """``adapter_grads`` of a lispetorch model with its expert adapters' gradients under PEFT's names and layout
    (``…experts.base_layer.lora_A.default``, ``(r·E, in)``)."""
    out = {k: g for k, g in grads.items() if k.split(".lora_", 1)[-1].count(".") < 2}  # not "A.<name>.<weight>"
    for name, layer in lt.adapter_layers(model).items():
        if not isinstance(layer, lt.LoraExperts):
            continue
        for p, key_mod in lt.experts.peft_module_names(name, layer, layer.parameter_names).items():
            for n in layer.lora_A:
                gA, gB = layer.lora_A[n][p].grad, layer.lora_B[n][p].grad
                if gA is None or gB is None:
                    out[f"{key_mod}.lora_A.{n}"] = out[f"{key_mod}.lora_B.{n}"] = None
                    continue
                A, B = lt.experts.to_peft(gA, gB)
                out[f"{key_mod}.lora_A.{n}"], out[f"{key_mod}.lora_B.{n}"] = A, B
    return out


def check_targets(base_dir: Path, ids, targets, tmp: Path,  # noqa: C901  (one check after another)
                  parameters: list[str] | None = None) -> dict[str, str]:
    """``{check: "" (pass) | reason}`` for one target set (``parameters``: expert weights, PEFT's
    ``target_parameters``), every model loaded afresh from ``base_dir``."""
    import peft

    base = load(base_dir)
    res: dict[str, str] = {}
    refused = None
    try:
        pm = peft.get_peft_model(load(base_dir), peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                                      target_modules=targets,
                                                                      target_parameters=parameters))
    except ValueError as e:  # PEFT's own rule: no LoRA on out_proj / conv1d of Mamba models
        found = re.search(r"Incompatible modules: \{(.*?)\}", str(e))
        if found is None:
            raise
        refused = sorted(re.findall(r"'([^']+)'", found.group(1)))
        pm = peft.get_peft_model(load(base_dir), peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                                      target_modules=targets,
                                                                      exclude_modules=refused,
                                                                      target_parameters=parameters))
    ours = load(base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lt.inject(ours, lt.LoraConfig(r=RANK, alpha=ALPHA, target_modules=targets, exclude_modules=refused,
                                      target_parameters=parameters))
    left_out = [str(w.message) for w in caught if "forward of its own" in str(w.message)]
    ours_experts = {(n, p) for n, m in lt.adapter_layers(ours).items() if isinstance(m, lt.LoraExperts)
                    for p in m.parameter_names}
    ours_set = {n for n, m in lt.adapter_layers(ours).items() if not isinstance(m, lt.LoraExperts)}
    experts = sorted(n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.ParamWrapper))
    peft_experts = {(lt.experts.unnest(n.removeprefix("base_model.model."))[0], m.parameter_name)
                    for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.ParamWrapper)}
    peft_set = {n for n in peft_adapted(pm) if not any(n.startswith(e.removeprefix("base_model.model."))
                                                       for e in experts)}
    n_ours = sum(p.numel() for p in lt.trainable_parameters(ours))
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    exclude = refused
    notes = [f"PEFT refuses {refused} on this model type; both compared without"] if refused else []
    if parameters:
        res["select"] = "" if (ours_set, ours_experts, n_ours) == (peft_set, peft_experts, n_peft) else (
            f"modules: only ours {sorted(ours_set - peft_set)[:3]}, only PEFT {sorted(peft_set - ours_set)[:3]}; "
            f"expert weights: only ours {sorted(ours_experts - peft_experts)[:2]}, only PEFT "
            f"{sorted(peft_experts - ours_experts)[:2]}; trainable {n_ours} vs {n_peft}")
    elif experts:
        res["select"] = (f"{MOE}: PEFT adapts {len(experts)} fused expert parameter modules through "
                         "target_parameters")
    elif ours_set == peft_set and n_ours == n_peft:
        res["select"] = ""
    else:
        extra = sorted(peft_set - ours_set)
        own_forward = [n for n in extra if type(submodule(base, n)).forward not in
                       (torch.nn.Linear.forward, transformers.pytorch_utils.Conv1D.forward)]
        if left_out and not (ours_set - peft_set) and extra == own_forward:
            res["select"] = ""
            notes.append(f"all-linear leaves out {sorted({n.rsplit('.', 1)[-1] for n in extra})} (own forward; "
                         "PEFT adapts them and breaks); PEFT compared without")
            exclude = (refused or []) + extra
        else:
            res["select"] = (f"modules: only ours {sorted(ours_set - peft_set)[:3]}, only PEFT "
                             f"{sorted(peft_set - ours_set)[:3]}; trainable {n_ours} vs {n_peft}")
    del pm

    def peft_config(**kw):
        return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, exclude_modules=exclude,
                               target_parameters=parameters, **kw)

    randomize(ours, 2)
    with torch.no_grad():
        ref = logits(ours, ids)
    # ours -> PEFT
    try:
        lt.save_adapter(ours, tmp / "ours")
        pm = peft.PeftModel.from_pretrained(load(base_dir), tmp / "ours", is_trainable=True).eval()
        with torch.no_grad():
            d = (logits(pm, ids) - ref).abs().max().item()
        res["to_peft"] = "" if d <= LOGITS_TOL else f"logits differ by {d:.2e}"
    except Exception as e:
        pm = None
        res["to_peft"] = f"PEFT: {short(e)}"
    # PEFT -> ours
    try:
        torch.manual_seed(3)
        theirs = peft.get_peft_model(load(base_dir), peft_config(init_lora_weights=False)).eval()
        with torch.no_grad():
            want = logits(theirs, ids)
        theirs.save_pretrained(tmp / "peft")
        loaded = load(base_dir)
        lt.load_adapter(loaded, tmp / "peft")
        with torch.no_grad():
            d = (logits(loaded, ids) - want).abs().max().item()
        res["from_peft"] = "" if d <= LOGITS_TOL else f"logits differ by {d:.2e}"
    except Exception as e:
        res["from_peft"] = short(e)
    if res["to_peft"] and res["from_peft"] == "":  # does PEFT reload its own adapter on this type?
        try:
            again = peft.PeftModel.from_pretrained(load(base_dir), tmp / "peft").eval()
            with torch.no_grad():
                d = (logits(again, ids) - want).abs().max().item()
            if d > LOGITS_TOL:
                res["to_peft"] += f" (PEFT reloading its own adapter differs by {d:.2e} too)"
        except Exception as e:  # noqa: BLE001
            res["to_peft"] += f" (PEFT cannot reload its own adapter either: {short(e)})"
    # adapters the model never calls (it reads the layer's weight directly)
    ours.zero_grad(set_to_none=True)
    try:
        loss_of(ours, ids).backward()
    except Exception:  # noqa: BLE001  (reported by the train check)
        pass
    dead = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n, g in adapter_grads(ours).items() if g is None})
    ours.zero_grad(set_to_none=True)
    # merge / unmerge
    try:
        before = {n.replace(".base_layer", ""): p.detach().clone() for n, p in ours.named_parameters()
                  if ".lora_" not in n}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lt.merge(ours)
            with torch.no_grad():
                d = (logits(ours, ids) - ref).abs().max().item()
            lt.unmerge(ours)
        after = {n.replace(".base_layer", ""): p for n, p in ours.named_parameters() if ".lora_" not in n}
        changed = [n for n, p in before.items() if not torch.equal(p, after[n])]
        warned = [str(w.message) for w in caught if "bit-exact" in str(w.message)]
        tol = 1e-4 * max(1.0, ref.abs().max().item())
        res["merge"] = (f"unmerge not exact: {changed[:2]}" if changed else f"warned: {warned[0][:120]}" if warned
                        else f"merged logits differ by {d:.2e}" if d > tol else "")
        if res["merge"].startswith("merged logits") and dead:
            res["merge"] += f" (the model reads {dead}'s weight directly: unmerged, their adapter is unused; PEFT " \
                            "the same)"
    except Exception as e:
        res["merge"] = f"{short(e)}"
    # one backward pass
    try:
        ours.zero_grad(set_to_none=True)
        loss_of(ours, ids).backward()
        stray = [n for n, p in ours.named_parameters() if ".lora_" not in n and p.grad is not None]
        g_ours = adapter_grads(ours)
        missing = [n for n, g in g_ours.items() if g is None]
        if stray or not any(g.abs().sum() > 0 for g in g_ours.values() if g is not None):
            res["train"] = f"gradients reach {stray[:2]}" if stray else "no gradient reaches the adapters"
        elif pm is None:
            res["train"] = "no PEFT model to compare with"
        else:
            loss_of(pm, ids).backward()
            g_ours = in_peft_layout(ours, g_ours)
            g_peft = adapter_grads(pm, "base_model.model.")
            bad = [n for n, g in g_ours.items() if n not in g_peft or (g is None) != (g_peft[n] is None) or
                   (g is not None and not torch.allclose(g, g_peft[n], rtol=1e-4, atol=1e-7))]
            res["train"] = f"gradients differ from PEFT's on {bad[:2]}" if bad else ""
            if missing and not bad:
                layers = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in missing})
                notes.append(f"no gradient reaches the adapters of {layers} (the model does not call them on "
                             "these inputs, or reads their weight directly; PEFT the same)")
    except Exception as e:
        res["train"] = f"{short(e)}"
    if parameters:
        if notes:
            res["note"] = "; ".join(notes)
        return res
    if not experts and model_type_of(base) in PEFT_MOE_REWRITE and any(res.get(c) for c in CHECKS):
        for c in CHECKS:
            if res.get(c):
                res[c] = f"{PEFT_MOE}: {res[c]}"
    if experts:  # PEFT also rewrites gate_proj / up_proj / down_proj targets into the experts' parameters
        for c in CHECKS:
            if res.get(c) and not res[c].startswith(MOE):
                res[c] = f"{MOE}: {res[c]}"
    if notes:
        res["note"] = "; ".join(notes)
    return res


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:160]


def check_type(model_type: str) -> dict:
    """The result record of one model type (run in a child process)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            base, ids = build(model_type, tmp / "base")
        except Exception as e:
            return {"type": model_type, "built": False, "reason": short(e)}
        record = {"type": model_type, "built": True, "results": {}}
        for which in TARGET_SETS:
            targets = "all-linear" if which == "all-linear" else attention_targets(base)
            parameters = expert_weights(base) if which == "experts" else None
            if (which == "experts" and not parameters) or (which == "attention" and not targets):
                record["results"][which] = None  # no attention projections, or no fused experts
                continue
            try:
                record["results"][which] = check_targets(tmp / "base", ids, targets, tmp / which, parameters)
            except Exception as e:
                record["results"][which] = {c: f"inject: {short(e)}" for c in CHECKS}
    return record


def run_child(model_type: str, conn) -> None:
    try:
        conn.send(check_type(model_type))
    except BaseException as e:  # noqa: BLE001  (reported to the parent)
        conn.send({"type": model_type, "built": True, "error": short(e)})
    finally:
        conn.close()


def run_one(model_type: str, timeout: float) -> dict:
    """Runs :func:`check_type` in a forked child with a time limit."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_child, args=(model_type, child), daemon=True)
    proc.start()
    child.close()
    record = None
    if parent.poll(timeout):
        try:
            record = parent.recv()
        except EOFError:
            record = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if record is None:
        reason = f"timed out after {timeout:.0f} s" if proc.exitcode in (None, -9) else \
            f"process died (exit {proc.exitcode})"
        record = {"type": model_type, "built": True, "error": reason}
    return record


# --- the table -----------------------------------------------------------------------------------------------------
def passed(record: dict, which: str | None = None) -> bool:
    if not record.get("built") or "error" in record:
        return False
    sets = TARGET_SETS if which is None else (which,)
    return all(record["results"].get(s) is None or not any(record["results"][s][c] for c in CHECKS) for s in sets)


def reason(record: dict) -> str:
    if "error" in record:
        return record["error"]
    parts = []
    for s in TARGET_SETS:
        r = record["results"].get(s)
        if r is None:
            continue
        for c in CHECKS:
            if r[c]:
                parts.append(f"{s} {c}: {r[c]}")
        if r.get("note"):
            parts.append(f"{s}: {r['note']}")
    return "; ".join(parts)


def mark(record: dict, which: str, check: str) -> str:
    if "error" in record:
        return "-"
    r = record["results"].get(which)
    return "n/a" if r is None else ("ok" if not r[check] else "FAIL")


def table(records: list[dict]) -> str:
    built = [r for r in records if r.get("built")]
    lines = [f"transformers {transformers.__version__}: {len(records)} causal-LM model types, {len(built)} built "
             f"tiny, {len(records) - len(built)} could not be built from their default config.", ""]
    head = ["model type"] + [f"{w} {c}" for w in TARGET_SETS for c in CHECKS] + ["reason / note"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in built:
        cells = [r["type"]] + [mark(r, w, c) for w in TARGET_SETS for c in CHECKS]
        lines.append("| " + " | ".join(cells) + " | " + reason(r).replace("|", "\\|") + " |")
    lines.append("")
    with_experts = [r for r in built if "error" in r or r["results"].get("experts") is not None]
    lines.append(f"All checks pass: {sum(passed(r) for r in built)} of {len(built)}; all-linear only: "
                 f"{sum(passed(r, 'all-linear') for r in built)}; attention targets only: "
                 f"{sum(passed(r, 'attention') for r in built)}; expert adapters (on the {len(with_experts)} types "
                 f"with fused experts): {sum(passed(r, 'experts') for r in with_experts)}.")
    for w in TARGET_SETS:
        counts = ", ".join(f"{c} {sum(mark(r, w, c) in ('ok', 'n/a') for r in built)}" for c in CHECKS)
        lines.append(f"Passing per check ({w}): {counts}.")
    lines.append("")
    lines.append("Not built: " + ", ".join(f"{r['type']} ({r['reason'][:80]})" for r in records if not r.get("built")))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("types", nargs="*", help="model types (default: every causal-LM type)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model type (default 300)")
    ap.add_argument("--jobs", type=int, default=1, help="model types checked at once (default 1)")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--json", help="also write the records to this file (JSON lines, appended as they come)")
    ap.add_argument("--table-from", help="print the table of records written by --json (the last of each type)")
    args = ap.parse_args(argv)
    types = args.types or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if args.table_from:
        last = {r["type"]: r for r in map(json.loads, Path(args.table_from).read_text().splitlines())}
        text = table([last[t] for t in types if t in last])
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n")
        return 0
    records = {}

    def one(model_type: str) -> None:
        t0 = time.perf_counter()
        record = run_one(model_type, args.timeout)
        records[model_type] = record
        status = "not built" if not record.get("built") else ("pass" if passed(record) else "FAIL")
        print(f"[{len(records)}/{len(types)}] {model_type}: {status} ({time.perf_counter() - t0:.0f} s) "
              f"{reason(record) if record.get('built') else record['reason']}"[:400], file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each thread waits on one child process
        list(pool.map(one, types))
    records = [records[t] for t in types]
    text = table(records)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
