"Tensors, devices and the loss: ``tensor_create``, ``tensor_reshape``, ``tensor_div``, ``tensor_shape``,
``tensor_slice``, ``torch_to_device``, ``torch_to_mps``, ``tensor_in_memory``, ``torch_cross_entropy``.

Examples::

    (setq t (tensor_create (integers 1 2 3 4)))    ; int64 tensor [1 2 3 4]
    (tensor_shape (tensor_reshape t (integers 2 -1)))  ; => [2 2]
    (tensor_slice t 0 1 3)                         ; => tensor [2 3]
"

(import gc
        sys
        torch
        torch.nn.functional :as F
        lispetorch.devices :as devices
        lispetorch.errors
        lispetorch.lisp.checks [primitive fail describe check-int check-string check-tensor])

(defn resolve-device [primitive name]
  "The ``torch.device`` for ``name`` (``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``), by the one device
  policy (:func:`lispetorch.devices.resolve_device`, not strict): an accelerator this machine lacks (a script
  written for ``mps`` run elsewhere) falls back to the best available device with a notice on stderr, once per
  name; a name that is no device at all is an error listing the devices available."
  (check-string primitive "device" name)
  (try
    (devices.resolve-device name :strict False :who primitive)
    (except [e lispetorch.errors.ConfigError]
      (fail primitive (str e)))))


(defn [primitive] tensor-create [data]
  "A tensor from a number or a (nested) list: integers give int64, numbers float32; a tensor is copied.

  ``(tensor_create (floats 4))`` ; => tensor [4.0]"
  (cond (isinstance data torch.Tensor) (.clone (.detach data))
        (or (isinstance data bool) (not (isinstance data #(int float list tuple))))
          (fail "tensor_create" f"expects a number or a list of numbers, got {(describe data)}")
        True (torch.tensor data)))


(defn [primitive] tensor-reshape [tensor shape]
  "``tensor`` with shape ``shape`` (a list of integers, one of them may be -1)."
  (check-tensor "tensor_reshape" "tensor" tensor)
  (when (or (not (isinstance shape #(list tuple)))
            (not (all (gfor d shape (and (isinstance d int) (not (isinstance d bool)))))))
    (fail "tensor_reshape" f"shape must be a list of integers, got {(describe shape)}"))
  (.reshape tensor shape))


(defn [primitive] tensor-div [tensor divisor]
  "``tensor / divisor`` elementwise (``divisor`` a tensor or a number, broadcast)."
  (check-tensor "tensor_div" "tensor" tensor)
  (when (not (or (isinstance divisor torch.Tensor)
                 (and (isinstance divisor #(int float)) (not (isinstance divisor bool)))))
    (fail "tensor_div" f"divisor must be a tensor or a number, got {(describe divisor)}"))
  (when (and (isinstance divisor torch.Tensor) (!= divisor.device tensor.device))
    (setv divisor (.to divisor tensor.device)))
  (torch.div tensor divisor))


(defn [primitive] tensor-shape [tensor]
  "The shape of ``tensor`` as a list of integers."
  (check-tensor "tensor_shape" "tensor" tensor)
  (list tensor.shape))


(defn [primitive] tensor-slice [tensor dim start end]
  "Elements ``start`` (included) to ``end`` (excluded) along dimension ``dim``; negative values count from
  the end, as in Python."
  (check-tensor "tensor_slice" "tensor" tensor)
  (setv dim (check-int "tensor_slice" "dim" dim)
        start (check-int "tensor_slice" "start" start)
        end (check-int "tensor_slice" "end" end))
  (when (not (<= (- tensor.ndim) dim (- tensor.ndim 1)))
    (fail "tensor_slice" f"dim {dim} does not exist in {(describe tensor)}"))
  (get tensor (tuple (+ (* [(slice None)] (% dim tensor.ndim)) [(slice start end)]))))


(defn [primitive] torch-to-device [tensor device]
  "``tensor`` on ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``)."
  (check-tensor "torch_to_device" "tensor" tensor)
  (.to tensor (resolve-device "torch_to_device" device)))


(defn [primitive] torch-to-mps [tensor]
  "``tensor`` on Apple's MPS device; on a machine without one, on the best device there is, with the notice of
  ``torch_to_device``."
  (check-tensor "torch_to_mps" "tensor" tensor)
  (.to tensor (resolve-device "torch_to_mps" "mps")))


(defn [primitive] tensor-in-memory []
  "How many tensors are alive in this process (parameters and buffers included)."
  (sum (gfor o (gc.get-objects) :if (issubclass (type o) torch.Tensor) 1)))


(defn [primitive] torch-cross-entropy [predictions targets]
  "Mean cross-entropy of ``predictions`` ``(N, C)`` (logits) against class indices ``targets`` ``(N,)``;
  targets equal to -100 are ignored. Returns a scalar tensor."
  (check-tensor "torch_cross_entropy" "predictions" predictions)
  (check-tensor "torch_cross_entropy" "targets" targets)
  (when (not (torch.is-floating-point predictions))
    (fail "torch_cross_entropy" f"predictions must be floating-point logits, got {(describe predictions)}"))
  (when (torch.is-floating-point targets)
    (fail "torch_cross_entropy" f"targets must be integer class indices, got {(describe targets)}"))
  (F.cross-entropy (.float predictions) (.to (.long targets) predictions.device) :ignore-index -100))


(export :objects [tensor-create tensor-reshape tensor-div tensor-shape tensor-slice torch-to-device
                  tensor-in-memory torch-cross-entropy torch-to-mps])
