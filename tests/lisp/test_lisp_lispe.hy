"The primitives LispE's scripts call that the guide does not: torch_to_mps and lispe_tiktoken's."

(pragma :warn-on-core-shadow False)
(require lispetorch.lisp.lispe *)

(import pytest
        torch
        lispetorch.lisp *
        lispetorch.lisp.checks [PrimitiveError])


(defn test-torch-to-mps-falls-back-with-the-device-notice [capfd]
  (setv t (tensor_create (floats 1 2 3))
        moved (torch_to_mps t))
  (assert (torch.equal (.cpu moved) t))
  (setv err (get (.readouterr capfd) 1))
  (when (not (torch.backends.mps.is-available))
    (assert (= moved.device.type (if (torch.cuda.is-available) "cuda" "cpu")))
    (assert (or (in "torch_to_mps: device 'mps' is not available here" err)
                ;; the notice is given once per device name in a process
                (= err "")) err))
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
