"""The LispE front end: the reader, each construct against LispE's documented results, lispe_tiktoken against the
model's own tokenizer, errors that name the script, line and form, and LispE's own LoRA program
(``../shared/lispe/lora_training.lisp``, as published) run to the end on the tiny default model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lispetorch.lisp.lispe_eval import Instance, Interpreter, LispeError
from lispetorch.lisp.lispe_reader import Form, LispeSyntaxError, Symbol, read_all, read_one

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED_LISPE = ROOT.parent / "shared" / "lispe"


def lispe(text: str, path: str = "<test>"):
    """The value of the last form of ``text``, run by a fresh interpreter."""
    return Interpreter(path).run_text(text)


# --- the reader ----------------------------------------------------------------------------------------------
def test_reader_atoms_strings_and_lines():
    forms = read_all('; a comment\n(setq x 70) (f -1 2e-4 1.0 "a\\n\\"b\\"" `C:\\raw\\n`)\n\n(g)')
    assert forms[0] == [Symbol("setq"), Symbol("x"), 70] and forms[0].line == 2
    f = forms[1]
    assert f[1:4] == [-1, 2e-4, 1.0] and isinstance(f[1], int) and isinstance(f[3], float)
    assert f[4] == 'a\n"b"'
    assert f[5] == "C:\\raw\\n"  # backquotes: nothing is escaped
    assert isinstance(f[0], Symbol) and not isinstance(f[4], Symbol)
    assert forms[2].line == 4 and forms[2].text == "(g)"


def test_reader_quote_empty_list_and_block_comments():
    assert read_one("'cleanup") == [Symbol("quote"), Symbol("cleanup")]
    assert read_one("()") == [] and isinstance(read_one("()"), Form)
    forms = read_all(";;\nnot (read) at all\n;;\n(x) ;; a one-line comment\n(y)")
    assert forms == [[Symbol("x")], [Symbol("y")]]


def test_reader_composition_dot():
    form = read_one("(tensor_div loss . torch_to_mps . tensor_create . floats n)")
    assert form == [Symbol("tensor_div"), Symbol("loss"),
                    [Symbol("torch_to_mps"), [Symbol("tensor_create"), [Symbol("floats"), Symbol("n")]]]]
    assert read_one('(printerr ".")') == [Symbol("printerr"), "."]  # a string "." is no dot


def test_reader_dictionary_literal():
    assert lispe('{"a":1 "b":(+ 1 1)}') == {"a": 1, "b": 2}


@pytest.mark.parametrize(("text", "message"), [
    ("(a (b)", "t.lisp:1: a list opened here is not closed"),
    ('(a\n"b)', 't.lisp:2: a string is not closed'),
    ("(a))", "t.lisp:1: unexpected ')'"),
    ("(a .)", "t.lisp:1: a composition dot needs a function on each side"),
])
def test_reader_errors_name_file_and_line(text, message):
    with pytest.raises(LispeSyntaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_all(text, "t.lisp")


# --- constructs, against LispE's documented results -----------------------------------------------------------
def test_setq_setg_scopes():
    # setq inside a function makes a local; setg sets the global.
    assert lispe("(setq counter 0) (defun inc() (setq counter (+ counter 1))) (inc) counter") == 0
    assert lispe("(setq counter 0) (defun inc() (setg counter (+ counter 1))) (inc) (inc) counter") == 2


def test_defun_optional_parameters_and_return():
    assert lispe("(defun f(a (b 10)) (+ a b)) (list (f 1) (f 1 2))") == [11, 3]
    assert lispe("(defun first_big(l) (loop x l (check (> x 2) (return x))) nil) (first_big (integers 1 5 3))") == 5


def test_if_with_and_without_else():
    assert lispe("(if (> 2 1) 'yes 'no)") == "yes"
    assert lispe("(if (< 2 1) 'yes 'no)") == "no"
    assert lispe("(if (< 2 1) 'yes)") is None
    with pytest.raises(LispeError, match="if expects 2 to 3 arguments, got 4"):
        lispe("(if true 1 2 3)")
    assert lispe("(ife (< 2 1) 1 2 3)") == 3


def test_check_ncheck_block_cond_select():
    assert lispe("(check (> 2 1) 1 2)") == 2
    assert lispe("(check () 1)") is None  # () is nil
    assert lispe("(ncheck (> 1 2) 'else 'then)") == "else"
    assert lispe("(block 1 2 (+ 1 2))") == 3
    assert lispe("(cond ((> 1 2) 'a) ((> 2 1) 'b) (true 'c))") == "b"
    assert lispe("(select nil nil 3 4)") == 3


def test_loops_and_updates():
    assert lispe("(setq s 0) (loopcount 10 i (+= s i)) s") == 45
    assert lispe("(setq s 0) (loopcount 3 (+= s 2)) s") == 6
    assert lispe("(setq s (list)) (loop x (strings \"a\" \"b\") (push s x)) s") == ["a", "b"]
    assert lispe("(setq x 0) (while (< x 10) (setq x (+ x 3))) x") == 12
    assert lispe("(setq x 0) (loopcount 10 i (check (== i 4) (break)) (+= x 1)) x") == 4
    assert lispe("(setq x 10) (-= x 4) (*= x 3) (/= x 2) x") == 9


def test_class_fields_methods_setqi_and_field_access():
    program = """
    (class@ Person (name (age 0))
        (defun greet() (+ "Hello, I'm " name))
        (defun birthday() (setqi age (+ age 1)) age)
        (defun older(n) (loopcount n (birthday)) age))
    (setq p (Person "Alice" 30))
    """
    assert lispe(program + "(p (greet))") == "Hello, I'm Alice"
    assert lispe(program + "(p (birthday)) (@ p 'age)") == 31
    assert lispe(program + "(p Person (older 3))") == 33  # the class named in the call
    assert lispe(program + "(@ (Person \"Bob\") 'age)") == 0  # a field's default
    assert lispe(program + "(set@ p 'age 40) (@ p 'age)") == 40
    with pytest.raises(LispeError, match="Person has no method 'fly'; its methods are greet, birthday, older"):
        lispe(program + "(p (fly))")


def test_class_initialiser_runs_on_the_new_instance():
    # (Class value (method)): the field after the values gets the method's result, run on the new instance.
    program = """
    (class@ Counter (start init)
        (defun configure() (setqi count (* start 2)) true)
        (defun get() count))
    (setq c (Counter 21 (configure)))
    (withclass Counter (list (c (get)) (@ c 'init)))
    """
    assert lispe(program) == [42, True]


def test_toclean_runs_the_method_when_the_program_ends(tmp_path, capsys):
    script = tmp_path / "clean.lisp"
    script.write_text("(class@ T (x)\n (defun configure() (toclean 'bye) true)\n (defun bye() (println \"bye\" x)))\n"
                      "(setq t1 (T 7))\n(t1 (configure))\n(println \"end\")\n")
    Interpreter(script).run_file(script)
    assert capsys.readouterr().out == "end\nbye 7\n"


def test_arithmetic_and_strings():
    assert lispe('(+ "epoch_" 3 ".pt")') == "epoch_3.pt"  # + of a string and a number concatenates
    assert lispe("(/ 10 4)") == 2.5 and lispe("(/ 8 4)") == 2 and isinstance(lispe("(/ 8 4)"), int)
    assert lispe("(% 7 3)") == 1 and lispe("(- 5)") == -5 and lispe("(* 2 3 4)") == 24
    assert lispe("(floor 3.7)") == 3 and lispe("(floor (* 137 0.8))") == 109
    assert lispe("(round 3.5)") == 4 and lispe("(round -2.5)") == -3
    assert lispe("(round (* 3.14159 100) 100)") == 3.14
    assert lispe('(fill "=" 5)') == "=====" and lispe('(fill "ab" 2)') == "abab"
    assert lispe("(== 1 1.0)") is True and lispe("(< 1 2 3)") is True and lispe("(>= 3 4)") is False
    assert lispe("(min 3 1 2)") == 1 and lispe("(max (integers 3 1 2))") == 3
    assert lispe("(and 1 true)") is True and lispe("(or nil 0)") is False and lispe("(not nil)") is True


def test_lists():
    assert lispe("(setq l (integers 2 3)) (pushfirst l 1) l") == [1, 2, 3]
    assert lispe("(@@ (integers 1 2 3 4 5) 1 3)") == [2, 3]
    assert lispe("(@@ (integers 1 2 3 4 5) 2)") == [3, 4, 5]
    assert lispe('(integers (strings "1" "2"))') == [1, 2]  # integers of a list converts it
    assert lispe("(integers 0)") == [0]
    assert lispe("(rho 3 (integers 0))") == [0, 0, 0] and lispe("(rho 2 2 (iota 4))") == [[1, 2], [3, 4]]
    assert lispe("(setq a (integers 1)) (extend a (integers 2 3)) a") == [1, 2, 3]
    assert lispe("(setq a (list (list 1))) (setq b (clone a)) (push (@ b 0) 2) a") == [[1]]
    assert lispe("(setq a (integers 1 2)) (setq b (copy a)) (push b 3) (size a)") == 2
    assert lispe("(chrbyte (integers 104 195 169))") == "hé"
    assert lispe('(in (strings "a" "b") "b")') is True and lispe("(nullp nil)") is True
    assert lispe('(@ (dictionary "a" (list 1 (dictionary "b" 7))) "a" 1 "b")') == 7


def test_elapse_current_load_command_and_memory(tmp_path):
    lib = tmp_path / "lib.lisp"
    lib.write_text("(defun twice(x) (* 2 x))\n")
    main = tmp_path / "main.lisp"
    main.write_text('(load (+ _current "lib.lisp"))\n(command (+ "mkdir -p " _current "made"))\n')
    interp = Interpreter(main)
    interp.run_file(main)
    assert interp.globals["_current"] == str(tmp_path.resolve()) + os.sep
    assert interp.run_text("(twice 21)") == 42
    assert (tmp_path / "made").is_dir()
    ms = interp.run_text("(elapse (loopcount 1000 (+ 1 1)))")
    assert isinstance(ms, float) and 0 < ms < 60_000
    assert interp.run_text("(memory_size)") > 1_000_000
    with pytest.raises(LispeError, match="command 'exit 3' failed with status 3"):
        interp.run_text('(command "exit 3")')


def test_use_loads_libraries_and_refuses_unknown_ones():
    interp = Interpreter()
    with pytest.raises(LispeError, match="unknown name 'tiktoken_create'"):
        interp.run_text("(tiktoken_create nil nil nil)")
    assert interp.run_text("(use 'lispe_torch) (use 'lispe_tiktoken)") is True
    assert callable(interp.builtins["tiktoken_create"])
    with pytest.raises(LispeError, match="unknown library 'lispe_blas'; the libraries are lispe_torch, lispe_tiktoken"):
        interp.run_text("(use 'lispe_blas)")


def test_primitives_are_lispetorchs_own():
    t = lispe("(setq t (tensor_create (integers 1 2 3 4))) (tensor_shape (tensor_reshape t (integers 2 -1)))")
    assert t == [2, 2]
    assert lispe("(@ (tensor_create (floats 2.5)) 0)") == 2.5
    assert lispe("(tensor_shape . tensor_create . floats 1 2)") == [2]  # composition over primitives


# --- errors ----------------------------------------------------------------------------------------------------
def test_error_names_script_line_form_and_calls(tmp_path):
    script = tmp_path / "bad.lisp"
    script.write_text('(defun load_it(name)\n    (torch_hf_forward name (integers 1 2)))\n\n(load_it "nomodel")\n')
    result = subprocess.run([str(BIN / "lispetorch"), "run", str(script)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    assert result.returncode == 1
    assert f"{script}:2: (torch_hf_forward name (integers 1 2))" in result.stderr, result.stderr
    assert "torch_hf_forward: no model named 'nomodel'" in result.stderr, result.stderr
    assert f"in load_it, called at {script}:4: (load_it \"nomodel\")" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_syntax_error_names_script_and_line(tmp_path):
    script = tmp_path / "open.lisp"
    script.write_text("(println 1)\n(println (+ 1 2)\n")
    result = subprocess.run([str(BIN / "lispetorch"), "run", str(script)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    assert result.returncode == 1
    assert f"{script}:2: a list opened here is not closed" in result.stderr, result.stderr
    assert "1\n" not in result.stdout  # nothing ran


def test_unknown_name_and_bad_call():
    with pytest.raises(LispeError, match="unknown name 'undefined_thing'"):
        lispe("(println undefined_thing)")
    with pytest.raises(LispeError, match="f takes 1 argument, got 2"):
        lispe("(defun f(x) x) (f 1 2)")
    with pytest.raises(LispeError, match="setqi sets a field of an instance"):
        lispe("(setqi x 1)")


# --- lispe_tiktoken --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiktoken_tok(tiny_default_model):
    interp = Interpreter()
    interp.globals["path"] = str(tiny_default_model)
    interp.run_text("""
    (use 'lispe_tiktoken)
    (setq tok_file (json_parse (fread (+ path "/tokenizer.json"))))
    (setq spec (json_parse (fread (+ path "/special_tokens_map.json"))))
    (setq tok (tiktoken_create (@ tok_file "model" "vocab") (@ tok_file "added_tokens")
                               (@ tok_file "pre_tokenizer" "pretokenizers" 0 "pattern" "Regex")))
    """)
    return interp


def test_default_model_tokenizer_has_llama3_layout(tiny_default_model):
    tok = json.loads((tiny_default_model / "tokenizer.json").read_text())
    pre = tok["pre_tokenizer"]
    assert pre["type"] == "Sequence"
    assert [p["type"] for p in pre["pretokenizers"]] == ["Split", "ByteLevel"]
    assert pre["pretokenizers"][0]["pattern"]["Regex"].startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)")
    spec = json.loads((tiny_default_model / "special_tokens_map.json").read_text())
    assert spec["bos_token"]["content"] == spec["eos_token"]["content"] == "<|endoftext|>"


def test_tiktoken_matches_the_models_own_tokenizer(tiktoken_tok, tiny_default_model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_default_model)
    text = Path(json.__file__).read_text()[:3000] + "\n  émoji ✓ 123456 it's\r\n"
    interp = tiktoken_tok
    interp.globals["text"] = text
    ids = interp.run_text("(tiktoken_encode tok text)")
    assert ids == hf.encode(text, add_special_tokens=False)
    assert interp.run_text("(tiktoken_decode tok (tiktoken_encode tok text))") == text
    assert bytes(interp.run_text("(tiktoken_decode_bytes tok (tiktoken_encode tok text))")) == text.encode()
    assert interp.run_text("(tiktoken_vocab_size tok)") == len(hf)
    eos = hf.convert_tokens_to_ids("<|endoftext|>")
    assert interp.run_text('(tiktoken_special_encode tok (@ spec "eos_token" "content"))') == eos
    assert interp.run_text('(tiktoken_special_encode tok "<|nothing|>")') == -1
    # A special token written in the text is encoded as itself.
    assert interp.run_text('(tiktoken_encode tok "a<|endoftext|>")')[-1] == eos


def test_tiktoken_refuses_a_vocabulary_that_is_not_byte_level():
    with pytest.raises(LispeError, match="tiktoken_create: the vocabulary lacks 254 of the 256 single bytes"):
        lispe('(use \'lispe_tiktoken) (tiktoken_create {"a":0 "b":1} (list) "\\\\w+")')
    with pytest.raises(LispeError, match="tiktoken_encode: expects a tiktoken_ object"):
        lispe('(use \'lispe_tiktoken) (tiktoken_encode "x" "text")')


# --- LispE's own LoRA program, as published --------------------------------------------------------------------
@pytest.mark.skipif(not (SHARED_LISPE / "lora_training.lisp").is_file(), reason="LispE's program is not beside")
def test_lispe_lora_training_runs_as_published(tmp_path, tiny_default_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in ("lora_training.lisp", "tamgu_dataset.json"):
        shutil.copy(SHARED_LISPE / name, tmp_path / name)
    (tmp_path / "llama3.1-8B").mkdir()
    (tmp_path / "llama3.1-8B" / "model").symlink_to(tiny_default_model, target_is_directory=True)
    (tmp_path / "llama3.1-8B" / "tokenizer").symlink_to(tiny_default_model, target_is_directory=True)
    # One thread: the tiny model's steps are too small to share out, and the suite runs beside other work.
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(BIN / "lispetorch"), "run", "lora_training.lisp"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    err = result.stderr
    assert result.returncode == 0, err[-4000:]
    assert "✓ Tokenizer configuré - vocab size: 512" in err
    assert "• Train: 109 échantillons" in err and "• Validation: 28 échantillons" in err
    assert "• Total steps: 81" in err
    assert "✅ Fine-tuning LoRA V2 terminé avec succès! 🎉" in err
    assert err.rstrip().endswith("🧹 Nettoyage du trainer...")  # toclean ran when the program ended
    assert "device 'mps' is not available here" in err

    info = json.loads((tmp_path / "checkpoints_v2" / "training_info_epoch_3.json").read_text())
    assert info["epoch"] == 3 and info["global_step"] == 81
    assert info["lora_config"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]

    adapter = tmp_path / "checkpoints_v2" / "lora_adapters_epoch_3.pt"
    base = AutoModelForCausalLM.from_pretrained(tiny_default_model)
    ids = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        before = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, adapter)
    peft_model.eval()
    with torch.no_grad():
        after = peft_model(ids).logits
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after)  # the trained adapter changes the model
    targets = {n.split(".")[-2] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_instance_repr():
    assert "Person instance" in repr(lispe("(class@ Person (n)) (Person 1)"))
    assert isinstance(lispe("(class@ Person (n)) (Person 1)"), Instance)


def test_readme_lispe_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```lisp\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "readme.lisp"
    script.write_text(block)
    result = subprocess.run([str(BIN / "lispetorch"), "run", str(script)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().endswith("count: 42"), result.stderr


def test_map_filter_apply_and_lambda():
    assert lispe("(map (lambda (x) (* x 2)) (integers 1 2 3))") == [2, 4, 6]
    assert lispe("(filter (λ (x) (> x 1)) (integers 1 2 3))") == [2, 3]
    assert lispe("(apply '+ (integers 1 2 3))") == 6
    assert lispe("(defun sq(x) (* x x)) (map 'sq (integers 1 2))") == [1, 4]
    assert lispe("(let ((a 1) (b 2)) (+ a b))") == 3


def test_remaining_core_functions(capsys):
    assert lispe("(setq a 1 b 2) (+ a b)") == 3  # setq of several pairs
    assert lispe('(join (strings "a" "b") "/")') == "a/b" and lispe('(split "a,b" ",")') == ["a", "b"]
    assert lispe('(trim "  x ")') == "x" and lispe("(car (integers 1 2))") == 1 and lispe("(cdr (integers 1 2))") == [2]
    assert lispe("(reverse (integers 1 2))") == [2, 1] and lispe("(sum (integers 1 2 3))") == 6
    assert lispe("(abs -2)") == 2 and lispe("(sqrt 16)") == 4.0 and lispe("(ceiling 1.2)") == 2
    assert lispe('(integer "12")') == 12 and lispe('(float "2.5")') == 2.5 and lispe("(string 3)") == "3"
    assert lispe("(typeof 1)") == "integer" and lispe('(typeof "a")') == "string" and lispe("(typeof nil)") == "nil"
    assert lispe("(irange 0 10 3)") == [0, 3, 6, 9] and lispe("(iota0 3)") == [0, 1, 2]
    assert lispe('(keys (dictionary "a" 1))') == ["a"] and lispe('(values (dictionary "a" 1))') == [1]
    assert lispe("(setq l (integers 1 2 3)) (pop l) l") == [1, 2]
    assert lispe("(emptyp (list))") is True and lispe("(maybe (@ (list) 3) 'fallback)") == "fallback"
    lispe('(print "a" 1) (println "b" 2.5 true nil (integers 1 2))')
    assert capsys.readouterr().out == "a 1b 2.5 true nil (1 2)\n"
