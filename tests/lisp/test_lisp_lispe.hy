"The primitives LispE's scripts call that the guide does not: torch_to_mps and lispe_tiktoken's."

(pragma :warn-on-core-shadow False)
(require lispetorch.lisp.lispe *)

(import os
        pathlib [Path]
        subprocess
        sys
        pytest
        torch
        lispetorch.lisp *
        lispetorch.lisp.checks [PrimitiveError])


(defn test-torch-to-mps-falls-back-with-the-device-notice [tmp-path]
  ;; In a process of its own (a LispE script): the device notice is given once per device name and process, and
  ;; other tests look for it.
  (setv script (/ tmp-path "mps.lisp"))
  (.write-text script (+ "(setq t (torch_to_mps (tensor_create (floats 1 2 3))))\n"
                         "(println (tensor_shape t) (@ t 2))\n"))
  (setv result (subprocess.run [(str (/ (. (Path sys.executable) parent) "lispetorch")) "run" (str script)]
                               :capture-output True :text True :timeout 120
                               :env {#** os.environ "TORCH_DEVICE_BACKEND_AUTOLOAD" "0"}))
  (assert (= result.returncode 0) result.stderr)
  (assert (= result.stdout "(3) 3.0\n"))
  (when (not (torch.backends.mps.is-available))
    (assert (in f"torch_to_mps: device 'mps' is not available here; using {(if (torch.cuda.is-available) "cuda" "cpu")}"
                result.stderr) result.stderr))
  (with [_ (pytest.raises PrimitiveError :match "torch_to_mps: tensor must be a tensor, got 3")]
    (torch_to_mps 3)))


(defn test-tiktoken-primitives-in-hy [tiny-default-model]
  ;; Hy scripts have lispe_tiktoken's primitives too: (use 'lispe_tiktoken) names a library that exists.
  (assert (use 'lispe_tiktoken))
  (setv tok-file (json_parse (fread (str (/ tiny-default-model "tokenizer.json"))))
        tok (tiktoken_create (@ tok-file "model" "vocab") (@ tok-file "added_tokens")
                             (@ tok-file "pre_tokenizer" "pretokenizers" 0 "pattern" "Regex"))
        ids (tiktoken_encode tok "def f(x):\n    return x<|endoftext|>"))
  (assert (= (get ids -1) (tiktoken_special_encode tok "<|endoftext|>") 0))
  (assert (= (tiktoken_decode tok ids) "def f(x):\n    return x<|endoftext|>"))
  (assert (= (bytes (tiktoken_decode_bytes tok (cut ids 0 3))) (.encode (tiktoken_decode tok (cut ids 0 3)))))
  (assert (= (tiktoken_vocab_size tok) 512))
  (with [_ (pytest.raises PrimitiveError :match "tiktoken_vocab_size: expects a tiktoken_ object")]
    (tiktoken_vocab_size "x")))
