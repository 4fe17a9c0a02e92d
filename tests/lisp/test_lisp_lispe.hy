"The primitive LispE's scripts call that the guide does not: torch_to_mps."

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
