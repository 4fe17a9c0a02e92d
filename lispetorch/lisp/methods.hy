"SVD-family methods and the checkpoint optimizer, as primitives in LispE's naming.

A method is chosen with ``torch_hf_lora_init``'s ``method`` option; these primitives cover what each method adds:
Rotational PiSSA's orthogonality penalty, saving any method as a plain PEFT LoRA on the original weights,
TinyLoRA's ``tiny_lora_v.pt``, NF4 quantisation of a frozen base, and the optimal combination of LoRA checkpoints.

Examples::

    (torch_hf_lora_init \"m\" 8 16 \"all-linear\" \"float32\" 0.0 \"rotational_pissa\" (dictionary \"method\" \"way0\"))
    (setq loss (+ task_loss (torch_hf_lora_orthogonality_loss \"m\")))
    (torch_hf_lora_save_as_lora \"m\" \"out/plain_lora\")
    (setq result (torch_lora_combine_optimize (dictionary \"a\" \"ckpt/a\" \"b\" \"ckpt/b\" \"t\" \"ckpt/t\") \"t\"))
    (torch_lora_combine_build (dictionary \"a\" \"ckpt/a\" \"b\" \"ckpt/b\") result \"combined\" \"svd\" 8)
"

(import lispetorch :as lt
        lispetorch [combine]
        lispetorch.lisp.checks [primitive fail describe check-int check-bool check-string check-dict]
        lispetorch.lisp.hf [entry])


(defn _model [primitive name]
  (. (entry primitive name) model))


(defn _checkpoints [primitive value]
  "A checkpoint list: a YAML path, or a dictionary name → checkpoint directory."
  (when (not (isinstance value #(str dict)))
    (fail primitive f"checkpoints must be a YAML path or a dictionary name → checkpoint directory, got {(describe value)}"))
  value)


(defn [primitive] torch-hf-lora-orthogonality-loss [model-name]
  "Rotational PiSSA ``way0``'s penalty λ(‖R_UᵀR_U − I‖² + ‖R_VᵀR_V − I‖²) summed over the adapted layers: a scalar
  tensor to add to the loss (zero for the exactly orthogonal ways)."
  (lt.orthogonality-loss (_model "torch_hf_lora_orthogonality_loss" model-name)))


(defn [primitive] torch-hf-lora-save-as-lora [model-name path]
  "Writes the model's adapter, whatever its method, as a plain PEFT LoRA directory on the original base weights
  (PiSSA's residual offset folded into a rank-2r adapter). Returns the path."
  (str (lt.save-as-lora (_model "torch_hf_lora_save_as_lora" model-name)
                        (check-string "torch_hf_lora_save_as_lora" "path" path))))


(defn [primitive] torch-hf-tinylora-save [model-name path]
  "Writes the TinyLoRA adapter's trained vector as ``tiny_lora_v.pt`` (the TinyLoRA format). Returns the path."
  (str (lt.save-tinylora (_model "torch_hf_tinylora_save" model-name) (check-string "torch_hf_tinylora_save" "path" path))))


(defn [primitive] torch-hf-tinylora-restore [model-name path [target-modules "all-linear"]]
  "Rebuilds a TinyLoRA adapter from ``tiny_lora_v.pt`` on the model (same base, seed, u and rank give the same
  logits). Returns the number of layers adapted."
  (len (lt.restore-tinylora (_model "torch_hf_tinylora_restore" model-name)
                            (check-string "torch_hf_tinylora_restore" "path" path) :target-modules target-modules)))


(defn [primitive] torch-hf-quantize-nf4 [model-name [target-modules "all-linear"] [double-quant False]]
  "Stores the selected frozen linear weights (under adapters: the base or residual) as NF4, 4 bits per weight in
  blocks of 64, dequantised on the fly. Returns the number of layers quantised."
  (check-bool "torch_hf_quantize_nf4" "double_quant" double-quant)
  (len (lt.quantize-nf4 (_model "torch_hf_quantize_nf4" model-name) target-modules :double-quant double-quant)))


(defn [primitive] torch-lora-combine-optimize [checkpoints target [layerwise False]]
  "The convex weights of the non-target checkpoints whose combined delta is closest to ``target``'s (Frobenius
  norm over all modules), from factored Gram products. Returns the results dictionary: ``weights`` (name →
  weight), ``global_weights``, ``evaluation`` (``relative_error``, ``r_squared``, …), per-module breakdown."
  (check-string "torch_lora_combine_optimize" "target" target)
  (check-bool "torch_lora_combine_optimize" "layerwise" layerwise)
  (combine.optimize (_checkpoints "torch_lora_combine_optimize" checkpoints) target layerwise
                    :log (fn [#* args] None)))


(defn [primitive] torch-lora-combine-build [checkpoints weights output-dir [mode "cat"] [rank None]
                                            [template None]]
  "Writes the combined adapter Σ wᵢΔWᵢ as a PEFT directory: ``mode`` ``\\\"cat\\\"`` (exact, rank Σrᵢ),
  ``\\\"svd\\\"`` (best rank-``rank`` approximation) or ``\\\"linear\\\"`` (A and B averaged: an approximation).
  ``weights`` is a dictionary name → weight or a result of ``torch_lora_combine_optimize``. Returns a dictionary
  with the output directory, the rank and the relative deviation from the exact sum."
  (check-string "torch_lora_combine_build" "mode" mode)
  (when (is-not rank None)
    (check-int "torch_lora_combine_build" "rank" rank 1))
  (check-dict "torch_lora_combine_build" "weights" weights)
  (combine.build (_checkpoints "torch_lora_combine_build" checkpoints) weights
                 (check-string "torch_lora_combine_build" "output_dir" output-dir) mode rank
                 (when (is-not template None) (check-string "torch_lora_combine_build" "template" template))
                 :overwrite True :log (fn [#* args] None)))


(export :objects [torch-hf-lora-orthogonality-loss torch-hf-lora-save-as-lora torch-hf-tinylora-save
                  torch-hf-tinylora-restore torch-hf-quantize-nf4 torch-lora-combine-optimize
                  torch-lora-combine-build])
