"Standalone LoRA layers (LispE's basic LoRA API): ``torch_linear``, ``torch_lora_linear``,
``torch_lora_apply_to_linear``, ``torch_lora_forward``, ``torch_lora_forward_with_gradients``,
``torch_lora_merge_weights``, ``torch_lora_trainable_params``, ``torch_lora_save_adapters``,
``torch_lora_load_adapters``, ``torch_lora_compute_delta``, ``torch_lora_get_adaptation_magnitude``.

A LoRA layer is a :class:`lispetorch.LoraLinear` holding one adapter named ``default``: the frozen base layer
plus ``s · B A`` with ``s = alpha / rank``. Adapters of a layer (or of every LoRA layer of a module) are saved
as one safetensors file: ``lora_A``/``lora_B`` per layer (prefixed by the layer's module name inside a model),
with rank, alpha and dropout in the file's metadata.

Examples::

    (setq layer (torch_lora_linear 512 256 16 32.0))
    (setq y (torch_lora_forward layer (tensor_create (floats …))))
    (torch_lora_save_adapters layer \"adapters.safetensors\")
"

(import json
        math
        torch
        torch [nn]
        safetensors.torch :as st
        lispetorch :as lt
        lispetorch.atomic
        lispetorch.lisp.checks [primitive fail describe check-int check-number check-bool check-tensor
                                check-string check-module])

(setv ADAPTER "default"
      METADATA-KEY "lispetorch_lora_layers")


(defn _layer [primitive value]
  (check-module primitive "lora_layer" value lt.LoraLinear "a LoRA layer (from torch_lora_linear)")
  (when (is value.active-adapter None)
    (fail primitive "the LoRA layer has no adapter"))
  value)


(defn _module [primitive value]
  (check-module primitive "model" value nn.Module "a LoRA layer or a model (a torch module)"))


(defn _input [primitive layer x]
  (check-tensor primitive "input" x)
  (when (not (torch.is-floating-point x))
    (fail primitive f"input must be a floating-point tensor, got {(describe x)}"))
  (when (or (= x.ndim 0) (!= (get x.shape -1) layer.in-features))
    (fail primitive f"input must end with {layer.in-features} features (the layer's in_features), got {(describe x)}"))
  x)


(defn [primitive] torch-linear [in-features out-features]
  "A linear layer ``y = x Wᵀ + b`` (``W`` ``(out, in)``, PyTorch's default initialisation)."
  (nn.Linear (check-int "torch_linear" "in_features" in-features 1)
             (check-int "torch_linear" "out_features" out-features 1)))


(defn [primitive] torch-lora-apply-to-linear [linear-layer rank alpha]
  "A LoRA layer around ``linear_layer`` (frozen, shared, not copied) with an adapter of rank ``rank`` and
  scaling ``alpha / rank``: A Kaiming-uniform, B zero, so it starts equal to the linear layer."
  (check-module "torch_lora_apply_to_linear" "linear_layer" linear-layer nn.Linear
                "a linear layer (from torch_linear)")
  (setv layer (lt.LoraLinear linear-layer))
  (.add-adapter layer ADAPTER
                (check-int "torch_lora_apply_to_linear" "rank" rank 1)
                (check-number "torch_lora_apply_to_linear" "alpha" alpha :positive True))
  layer)


(defn [primitive] torch-lora-linear [in-features out-features rank alpha]
  "A new linear layer ``in_features → out_features`` with a LoRA adapter of rank ``rank``, scaling
  ``alpha / rank``."
  (torch-lora-apply-to-linear (torch-linear in-features out-features) rank alpha))


(defn [primitive] torch-lora-forward [lora-layer input]
  "``x Wᵀ + b + (alpha/rank) · (x Aᵀ) Bᵀ`` for ``input`` ``(…, in_features)``."
  (setv layer (_layer "torch_lora_forward" lora-layer))
  (layer (_input "torch_lora_forward" layer input)))


(defn [primitive] torch-lora-forward-with-gradients [lora-layer input retain-graph]
  "The forward pass with gradients recorded even where ``torch_set_grad_enabled`` turned them off; with
  ``retain_graph`` true the output also keeps its own gradient (``.grad``) after ``torch_backward``."
  (setv layer (_layer "torch_lora_forward_with_gradients" lora-layer)
        keep (check-bool "torch_lora_forward_with_gradients" "retain_graph" retain-graph))
  (with [_ (torch.enable-grad)]
    (setv out (layer (_input "torch_lora_forward_with_gradients" layer input))))
  (when (and keep out.requires-grad)
    (.retain-grad out))
  out)


(defn [primitive] torch-lora-merge-weights [lora-layer]
  "Folds the adapter into the base weight (of one layer, or of every LoRA layer of a model): the output is
  unchanged and the adapter costs nothing more at inference. Merging twice is merging once. Returns true."
  (setv m (_module "torch_lora_merge_weights" lora-layer))
  (if (isinstance m lt.LoraLinear) (.merge m) (lt.merge m))
  True)


(defn [primitive] torch-lora-trainable-params [model]
  "The parameters that train (the active adapters' A and B) of a LoRA layer or a model, as a list."
  (lt.trainable-parameters (_module "torch_lora_trainable_params" model)))


(defn _layers [primitive model]
  (setv m (_module primitive model))
  (setv layers (if (isinstance m lt.LoraLinear) {"" m} (lt.adapter-layers m))
        experts (lfor [n l] (.items layers) :if (isinstance l lt.LoraExperts) n))
  (when experts
    (fail primitive (+ f"{(describe model)} has adapters on expert weights ({(repr (get experts 0))}), which this "
                       "per-layer file does not hold: save the model's adapter with torch_hf_lora_save")))
  (when (not layers)
    (fail primitive f"{(describe model)} has no LoRA layer"))
  layers)


(defn _key [prefix name]
  (if prefix f"{prefix}.{name}" name))


(defn [primitive] torch-lora-save-adapters [model path]
  "Writes the active adapter of a LoRA layer (or of every LoRA layer of a model) to ``path``, a safetensors
  file, atomically. Returns the path."
  (check-string "torch_lora_save_adapters" "path" path)
  (setv tensors {}
        meta {})
  (for [[prefix layer] (.items (_layers "torch_lora_save_adapters" model))]
    (setv name layer.active-adapter)
    (when (is name None) (continue))
    (setv [A B R] (.factors layer name))
    (setv (get tensors (_key prefix "lora_A")) (.contiguous (.detach A))
          (get tensors (_key prefix "lora_B")) (.contiguous (.detach B)))
    (when (is-not R None)
      (setv (get tensors (_key prefix "lora_R")) (.contiguous (.detach R))))
    (setv (get meta prefix) {"rank" (get layer.r name) "alpha" (get layer.lora-alpha name)
                             "dropout" (get layer.lora-dropout name) "use_rslora" (get layer.use-rslora name)}))
  (lispetorch.atomic.write-bytes path (st.save tensors :metadata {METADATA-KEY (json.dumps meta)}))
  path)


(defn [primitive] torch-lora-load-adapters [model path]
  "Reads adapters written by ``torch_lora_save_adapters`` into a LoRA layer (or a model's LoRA layers) of
  the same shapes; everything is checked before anything changes. Returns true."
  (check-string "torch_lora_load_adapters" "path" path)
  (setv layers (_layers "torch_lora_load_adapters" model))
  (with [fh (st.safe-open path :framework "pt")]
    (setv meta-text (.get (or (.metadata fh) {}) METADATA-KEY))
    (when (is meta-text None)
      (fail "torch_lora_load_adapters" f"{path} was not written by torch_lora_save_adapters (no {METADATA-KEY})"))
    (setv meta (json.loads meta-text)
          tensors (dfor k (.keys fh) k (.get-tensor fh k))))
  (setv plan [])
  (for [[prefix layer] (.items layers)]
    (when (not-in prefix meta)
      (fail "torch_lora_load_adapters" f"{path} holds no adapter for layer {(repr prefix)}; it has {(list meta)}"))
    (setv A (get tensors (_key prefix "lora_A"))
          B (get tensors (_key prefix "lora_B"))
          R (.get tensors (_key prefix "lora_R"))
          r (get (get meta prefix) "rank"))
    (when (or (!= (tuple A.shape) #(r layer.in-features)) (!= (tuple B.shape) #(layer.out-features r)))
      (fail "torch_lora_load_adapters"
            (+ f"{path}: layer {(repr prefix)} has A {(list A.shape)} and B {(list B.shape)}, but the layer needs "
               f"A [{r}, {layer.in-features}] and B [{layer.out-features}, {r}]")))
    (.append plan #(layer A B R (get meta prefix))))
  (for [[layer A B R m] plan]
    (setv name (or layer.active-adapter ADAPTER)
          dtype (. (get layer.lora-A name) dtype))
    (.set-factors layer name (.to A dtype) (.to B dtype) :alpha (get m "alpha") :dropout (get m "dropout")
                  :use-rslora (get m "use_rslora") :R (if (is R None) None (.to R dtype))))
  True)


(defn [primitive] torch-lora-compute-delta [lora-layer]
  "The weight change of the layer's adapter, ``(alpha/rank) · B A``, as an ``(out, in)`` float32 tensor."
  (setv layer (_layer "torch_lora_compute_delta" lora-layer)
        name layer.active-adapter
        [A B R] (.factors layer name))
  (lt.ops.lora-delta (.detach A) (.detach B) (if (is R None) None (.detach R)) (get layer.scaling name)))


(defn [primitive] torch-lora-get-adaptation-magnitude [lora-layer]
  "How large the adaptation is next to the weight it adapts: ``‖ΔW‖_F / ‖W‖_F`` (0 for a fresh adapter)."
  (setv layer (_layer "torch_lora_get_adaptation_magnitude" lora-layer)
        delta (torch-lora-compute-delta layer)
        base (.float (.detach (.base-weight layer))))
  (when layer.merged
    (setv base (- base delta)))  ; the stored weight already holds the delta
  (/ (float (torch.linalg.matrix-norm delta)) (float (torch.linalg.matrix-norm base))))


(export :objects [torch-linear torch-lora-linear torch-lora-apply-to-linear torch-lora-forward
                  torch-lora-forward-with-gradients torch-lora-merge-weights torch-lora-trainable-params
                  torch-lora-save-adapters torch-lora-load-adapters torch-lora-compute-delta
                  torch-lora-get-adaptation-magnitude])
