"LispE-style macros and functions, `lispetorch run`, and a check that the Hy tests call every primitive."

(pragma :warn-on-core-shadow False)
(require lispetorch.lisp.lispe *)

(import json :as pyjson
        os
        pathlib [Path]
        re
        subprocess
        sys
        textwrap
        pytest
        torch
        lispetorch.lisp [primitives]
        lispetorch.lisp *
        lispetorch.lisp.checks [PrimitiveError]
        lispetorch.lisp.runner [execute])

(setv HERE (. (Path __file__) parent))


(defn test-setq-defun-check-loopcount-loop-block []
  (setq total 0)
  (defun add_twice(x (times 2)) (* x times))
  (assert (= (add_twice 3) 6))
  (assert (= (add_twice 3 5) 15))
  (loopcount 4 i (+= total i))
  (assert (= total 6))
  (loopcount 3 (+= total 1))
  (assert (= total 9))
  (setq seen (list))
  (loop x (strings "a" "b") (push seen x))
  (assert (= seen ["a" "b"]))
  (assert (= (block 1 2 3) 3))
  (assert (= (check (> total 5) "big" "bigger") "bigger"))
  (assert (is (check (< total 5) "small") nil))
  (with [e (pytest.raises PrimitiveError :match "loopcount: expects a non-negative integer count, got 'x'")]
    (loopcount "x" (+= total 1))))


(defn test-lispe-truthiness []
  ;; A tensor is true whenever it exists, whatever its values (Python would refuse or say false).
  (assert (= (check (torch.zeros 1) "yes") "yes"))
  (assert (= (check (torch.zeros 3 3) "yes") "yes"))
  (assert (= (check (torch.tensor []) "yes") "yes"))
  (for [v [nil false 0 0.0 "" [] {}]]
    (assert (is (check v "yes") nil) v))
  (for [v [true 1 -2.5 "x" [0] {"a" 0}]]
    (assert (= (check v "yes") "yes") v)))


(defn test-at []
  (setq config (dictionary "lora" (dictionary "targets" (strings "q_proj" "v_proj")) "rank" 8))
  (assert (= (@ config "lora" "targets" 1) "v_proj"))
  (assert (= (@ config "rank") 8))
  (setq t (tensor_create [[1.0 2.0] [3.0 4.0]]))
  (assert (= (@ t 1 0) 3.0))
  (assert (= (.tolist (@ t 0)) [1.0 2.0]))
  (assert (= (@ (torch.tensor 2.5) 0) 2.5))  ; a scalar reads as a one-element tensor
  (assert (torch.equal (@ t t) (torch.matmul t t)))  ; two tensors still multiply
  (assert (= (@ (torch.tensor [5 6 7]) (torch.tensor 1)) 6))  ; an integer tensor indexes
  (with [e (pytest.raises PrimitiveError)]
    (@ config "lora" "rank"))
  (assert (in "@: no key 'rank' in the dictionary; its keys are ['targets']" (str e.value)))
  (assert (in "test_lisp_macros.hy:" (str e.value)))
  (with [e (pytest.raises PrimitiveError :match "index 2 is out of range for a list of 2")]
    (@ config "lora" "targets" 2))
  (with [e (pytest.raises PrimitiveError :match "index 5 is out of range for a tensor of shape \\[2, 2\\]")]
    (@ t 5)))


(defn test-constructors-strings-sizes []
  (assert (= (dictionary "a" 1 "b" (floats 1 2)) {"a" 1 "b" [1.0 2.0]}))
  (with [e (pytest.raises PrimitiveError :match "dictionary: expects keys and values in pairs, got 3")]
    (dictionary "a" 1 "b"))
  (assert (= (integers 1 -1 2.0) [1 -1 2]))
  (with [e (pytest.raises PrimitiveError :match "integers: element 1 must be an integer, got 2.5")]
    (integers 1 2.5))
  (with [e (pytest.raises PrimitiveError :match "strings: element 0 must be a string, got 3")]
    (strings 3))
  (with [e (pytest.raises PrimitiveError :match "floats: element 0 must be a number, got 'x'")]
    (floats "x"))
  (assert (= (string 3) "3"))
  (assert (= (string true) "true"))
  (assert (= (string nil) "nil"))
  (assert (= (string (integers 1 2)) "(1 2)"))
  (assert (= (size "abc") 3))
  (assert (= (size (dictionary "a" 1)) 1))
  (assert (= (size (torch.zeros 4 2)) 4))
  (assert (= (size (torch.tensor 1.0)) 1))
  (with [e (pytest.raises PrimitiveError :match "size: expects a string, list, dictionary or tensor, got 3")]
    (size 3))
  (assert (= (push [1] 2) [1 2]))
  (with [e (pytest.raises PrimitiveError :match "push: expects a list")]
    (push "ab" "c"))
  (assert (== 2 2.0 2))
  (assert (not (== 1 2)))
  (assert (use 'lispe_torch))
  (assert (use "lispe_tiktoken"))
  (with [e (pytest.raises PrimitiveError :match "unknown library 'numpy'")]
    (use 'numpy)))


(defn test-println-files-json [tmp-path capsys]
  (println "loss:" 1.5 true nil (strings "a" "b"))
  (assert (= (. (.readouterr capsys) out) "loss: 1.5 true nil (a b)\n"))
  (setv path (str (/ tmp-path "info.json"))
        value (dictionary "epoch" 1 "weights" (tensor_create (floats 0.5 2)) "name" "été"))
  (assert (fwrite path (json value)))
  (assert (= (json_parse (fread path)) {"epoch" 1 "weights" [0.5 2.0] "name" "été"}))
  (assert (= (os.listdir tmp-path) ["info.json"]))  ; written atomically: no temporary file left
  (with [e (pytest.raises PrimitiveError :match "json_parse: not valid JSON \\(line 2, column 1")]
    (json_parse "{\"a\": 1,\n}"))
  (with [e (pytest.raises PrimitiveError :match "json: cannot write <object object at .*> \\(an object\\) as JSON")]
    (json (dictionary "f" (object))))
  (with [e (pytest.raises PrimitiveError :match "fwrite: text must be a string, got 3")]
    (fwrite path 3))
  (with [e (pytest.raises PrimitiveError :match "fread: .*No such file")]
    (fread (str (/ tmp-path "missing.txt")))))


;; --- lispetorch run ----------------------------------------------------------------------------------------
(defn run-cli [#* args]
  (subprocess.run [sys.executable "-m" "lispetorch.cli" "run" #* args] :capture-output True :text True
                  :env (dict os.environ :LISPETORCH_DEBUG "")))


(defn test-run-script-arguments-and-scope [tmp-path]
  (setv script (/ tmp-path "args.hy"))
  (.write-text script (textwrap.dedent "
    (use 'lispe_torch)
    (defun show(xs) (println \"args:\" (size xs) (@ xs 0)))
    (show (cut sys.argv 1 None))
    (println (tensor_shape (torch_lora_forward (torch_lora_linear 4 2 2 4.0) (tensor_create (floats 1 2 3 4)))))
    (sys.exit 3)"))
  (setv result (run-cli (str script) "first" "--flag"))
  (assert (= result.returncode 3) result.stderr)
  (assert (= (.splitlines result.stdout) ["args: 2 first" "(2)"]) result.stdout))


(defn test-run-script-error-points-at-the-script [tmp-path]
  (setv script (/ tmp-path "broken.hy"))
  (.write-text script "(setq layer (torch_lora_linear 4 2 2 4.0))\n\n(defun go(x)\n    (torch_lora_forward layer x))\n(go (tensor_create (floats 1 2 3)))\n")
  (setv result (run-cli (str script)))
  (assert (= result.returncode 1))
  (setv err result.stderr)
  (assert (.startswith err "Traceback (most recent call last):") err)
  (assert (in f"File \"{script}\", line 5, in <module>" err) err)
  (assert (in f"File \"{script}\", line 4, in go" err) err)
  (assert (in "broken.hy:4: torch_lora_forward: input must end with 4 features (the layer's in_features), got a tensor of shape [3]" err) err)
  ;; Only the script's frames: nothing of lispetorch, Hy or torch.
  (assert (= (len (re.findall "File \"" err)) 2) err)
  (assert (not-in "site-packages" err) err)
  ;; A script that does not read: Hy's message with the place.
  (.write-text script "(println \"x\"\n")
  (setv result (run-cli (str script)))
  (assert (= result.returncode 1))
  (assert (in "line 1" result.stderr) result.stderr)
  (assert (in "Premature end of input" result.stderr) result.stderr)
  (setv result (run-cli (str (/ tmp-path "missing.hy"))))
  (assert (= result.returncode 2))
  (assert (in "lispetorch run: error: no script at" result.stderr)))


(defn test-execute-returns-globals-and-restores-argv [tmp-path]
  (setv script (/ tmp-path "g.hy")
        argv sys.argv)
  (.write-text script "(setq x (+ (int (@ sys.argv 1)) 1))\n(setq names (list (sorted (dictionary \"b\" 1 \"a\" 2))))\n")
  (setv g (execute script ["41"]))
  (assert (= (get g "x") 42))
  (assert (= (get g "names") ["a" "b"]))
  (assert (is sys.argv argv)))


;; --- every primitive is called by the Hy tests ----------------------------------------------------------------
(defn test-every-primitive-is-called-by-a-hy-test []
  (setv text (.join "\n" (lfor p (.glob HERE "test_*.hy") (.read-text p :encoding "utf-8")))
        names (lfor name (primitives) :if (not-in name #("nil" "true" "false" "truthy" "at")) name)
        called (fn [name] (re.search (+ "\\(" (re.escape name) "[\\s)]") text))
        missing (lfor name names :if (not (or (called name) (called (hy.unmangle name)))) name))
  (assert (>= (len names) 50) names)
  (assert (not missing) missing))
