"""Tasks with metrics: the loaders on files in each layout, their errors, SQuAD v2 and classification metrics
against hand-computed values, verbalizer scoring against the model's own log-probabilities, and the shipped
tasks."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import lispetorch as lt
from lispetorch import tasks


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_squad_v2_by_hand():
    preds = ["The Cat sat!", "cat on mat", "", "something", ""]
    golds = [("cat sat",), ("the cat sat on the mat", "dog"), (), (), ("x y",)]
    m = tasks.squad_v2(preds, golds)
    # EM: 1 (normalised equal), 0, 1 (no answer, none given), 0 (answered an unanswerable), 0 (missed an answer)
    assert m["exact"] == pytest.approx(40.0)
    # F1: 1; cat on mat vs cat sat on mat: P 3/3, R 3/4 → 6/7; 1; 0; 0
    assert m["f1"] == pytest.approx(100 * (2 + 6 / 7) / 5)
    assert m["HasAns_exact"] == pytest.approx(100 / 3) and m["HasAns_f1"] == pytest.approx(100 * (1 + 6 / 7) / 3)
    assert m["NoAns_exact"] == pytest.approx(50.0) and m["NoAns_f1"] == pytest.approx(50.0)
    assert (m["total"], m["HasAns_total"], m["NoAns_total"]) == (5, 3, 2)
    assert tasks.normalize_answer("  An  Apple, the pie. ") == "apple pie"


def test_classification_metrics_by_hand():
    m = tasks.classification_metrics(list("111100"), list("100110"))
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(100 * 4 / 7)  # label 1: tp 2, fp 2, fn 1
    assert m["macro_f1"] == pytest.approx(100 * (4 / 7 + 2 / 5) / 2)  # label 0: tp 1, fp 1, fn 2


def test_loaders_read_each_layout(tmp_path):
    sst = _write(tmp_path / "sst2.jsonl", [{"sentence": "a fine film", "label": 1}, {"sentence": "dull", "label": 0}])
    mrpc = _write(tmp_path / "mrpc.jsonl", [{"sentence1": "A b.", "sentence2": "B a.", "label": 1, "idx": 0}])
    squad = _write(tmp_path / "squad.jsonl", [
        {"id": "1", "question": "Who?", "context": "It was Ann.", "answers": {"text": ["Ann"], "answer_start": [7]}},
        {"id": "2", "question": "When?", "context": "It was Ann.", "answers": {"text": [], "answer_start": []}}])
    task = tasks.load_task({"kind": "classification", "train_file": str(sst), "eval_file": str(sst),
                            "verbalizers": {0: "negative", 1: "positive"}})
    assert [r.label for r in task.train] == ["1", "0"]
    assert task.documents()[0][:2] == ("Sentence: a fine film\nLabel:", " positive")
    pair = tasks.load_task({"kind": "classification", "train_file": str(mrpc), "eval_file": str(mrpc),
                            "verbalizers": {0: "no", 1: "yes"}})
    assert pair.documents()[0][:2] == ("Sentence 1: A b.\nSentence 2: B a.\nLabel:", " yes")
    qa = tasks.load_task({"kind": "qa", "train_file": str(squad), "eval_file": str(squad)})
    assert [r.answers for r in qa.eval] == [("Ann",), ()]
    assert [d[1] for d in qa.documents()] == [" Ann\n", f" {tasks.NO_ANSWER}\n"]


def test_loader_errors_name_file_line_and_field(tmp_path):
    verbal = {"0": "negative", "1": "positive"}
    bad = _write(tmp_path / "a.jsonl", [{"sentence": "ok", "label": 1}, {"text": "no sentence", "label": 0}])
    with pytest.raises(lt.DataError, match=r"a\.jsonl:2: missing field 'sentence'"):
        tasks.read_records(bad, verbal)
    bad = _write(tmp_path / "b.jsonl", [{"sentence": "ok", "label": 1}, {"sentence": "x", "label": 2}])
    with pytest.raises(lt.DataError, match=r"b\.jsonl:2: field 'label' is 2, which is not one of the verbalizer"):
        tasks.read_records(bad, verbal)
    bad = _write(tmp_path / "c.jsonl", [{"question": "Who?", "context": "It was Ann.",
                                         "answers": {"text": ["Ann"], "answer_start": [3]}}])
    with pytest.raises(lt.DataError, match=r"c\.jsonl:1: field 'answers\.answer_start' 3 does not point at the "
                                           r"answer 'Ann'"):
        tasks.read_records(bad)
    bad = _write(tmp_path / "d.jsonl", [{"question": "Who?", "answers": {"text": [], "answer_start": []}}])
    with pytest.raises(lt.DataError, match=r"d\.jsonl:1: missing field 'context'"):
        tasks.read_records(bad)
    bad = _write(tmp_path / "e.jsonl", [{"sentence1": "a", "label": 0}])
    with pytest.raises(lt.DataError, match=r"e\.jsonl:1: missing field 'sentence2'"):
        tasks.read_records(bad, verbal)
    with pytest.raises(lt.ConfigError, match="task.verbalizers"):
        tasks.load_task({"kind": "classification", "train_file": str(tmp_path / "a.jsonl"),
                         "eval_file": str(tmp_path / "a.jsonl")})
    with pytest.raises(lt.ConfigError, match="'task.name' 'sst9'"):
        tasks.load_task("sst9")


def test_verbalizer_scores_are_the_models_log_probabilities(tiny_default_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_default_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_default_model)
    rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(["Return the sum.", "A class for things.",
                                                                   "Open a file.", "Base class of errors."])]
    f = _write(tmp_path / "t.jsonl", rows)
    task = tasks.load_task({"kind": "classification", "train_file": str(f), "eval_file": str(f),
                            "verbalizers": {0: "function", 1: "class"}})
    preds = task.predict(model, tok)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id else []
    for rec, pred in zip(task.eval, preds, strict=True):
        scores = {}
        for label, word in task.verbalizers.items():
            p = bos + tok(task.prompt(rec), add_special_tokens=False)["input_ids"]
            w = tok(" " + word, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([p + w])).logits[0].log_softmax(-1)
            scores[label] = sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(w))
        assert pred == max(scores, key=scores.get)
    m = task.evaluate(model, tok)
    assert 0 <= m["accuracy"] <= 100 and m["total"] == 4


def test_answers_of_a_dora_model_are_generated_with_its_row_scaling_kept(tiny_default_model, tmp_path, monkeypatch):
    """QA answers are generated token by token; a DoRA model's layers keep g between those forwards (lt.dora_caching)
    and give the answers they give when computing the norms at every forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_default_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_default_model)
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    with torch.no_grad():
        for i, layer in enumerate(lt.adapter_layers(model).values()):
            layer.lora_B["default"].normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    model.eval()
    f = _write(tmp_path / "q.jsonl", [
        {"question": "Who?", "context": "It was Ann.", "answers": {"text": ["Ann"], "answer_start": [7]}},
        {"question": "What opens?", "context": "A file opens.", "answers": {"text": [], "answer_start": []}}])
    task = tasks.load_task({"kind": "qa", "train_file": str(f), "eval_file": str(f), "max_new_tokens": 6})
    layer = next(iter(lt.adapter_layers(model).values()))
    kept = []
    handle = layer.register_forward_hook(lambda module, args, out: kept.append(bool(module.dora_cache)))
    answers = task.predict(model, tok)
    assert kept and all(kept) and not layer.dora_cache and not layer.dora_caching
    monkeypatch.setattr(tasks, "caching_while_generating", lambda m: contextlib.nullcontext())  # norms every forward
    kept.clear()
    assert task.predict(model, tok) == answers
    assert kept and not any(kept)
    handle.remove()


def test_shipped_tasks_are_deterministic_and_split(tmp_path):
    a = tasks.build_shipped("stdlib-kind", tmp_path / "a")
    b = tasks.build_shipped("stdlib-kind", tmp_path / "b")
    for key in ("train_file", "eval_file"):
        assert open(a[key]).read() == open(b[key]).read()
    kind = tasks.load_task(a)
    assert len(kind.train) > 200 and len(kind.eval) > 50
    assert {r.label for r in kind.eval} == {"0", "1"}
    shared = {r.fields["sentence"] for r in kind.train} & {r.fields["sentence"] for r in kind.eval}
    assert len(shared) < 10  # files split apart; only a few stock lines ("Return a copy.") recur across files
    qa = tasks.load_task(tasks.build_shipped("stdlib-signature", tmp_path / "a"))
    assert any(not r.answers for r in qa.eval) and any(r.answers for r in qa.eval)
    for r in qa.train[:50]:  # every answer_start was checked by the loader; spot-check the layout
        assert not r.answers or r.answers[0] in r.fields["context"]
