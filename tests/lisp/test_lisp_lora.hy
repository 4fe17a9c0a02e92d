"The basic LoRA primitives against plain-PyTorch references."

(import pytest
        torch
        lispetorch :as lt
        lispetorch.lisp *
        lispetorch.lisp.checks [PrimitiveError])


(defn factors [layer]
  (.factors layer "default"))


(defn randomize [layer]
  (with [_ (torch.no-grad)]
    (for [p (torch_lora_trainable_params layer)]
      (.copy- p (* 0.1 (torch.randn p.shape))))))


(defn reference [layer x]
  "``x Wᵀ + b + (alpha/r) (x Aᵀ) Bᵀ`` in plain PyTorch."
  (setv [A B _] (factors layer)
        base layer.base-layer)
  (+ (torch.nn.functional.linear x base.weight base.bias) (* (get layer.scaling "default") (@ (@ x A.T) B.T))))


(defn test-linear-and-lora-linear-forward []
  (setv linear (torch_linear 8 5))
  (assert (isinstance linear torch.nn.Linear))
  (assert (= (list linear.weight.shape) [5 8]))
  (setv layer (torch_lora_linear 8 5 2 4.0))
  (assert (= (get layer.scaling "default") 2.0))
  (setv x (torch.randn 3 8))
  ;; A fresh adapter (B = 0) is the linear layer itself.
  (assert (torch.equal (torch_lora_forward layer x) (layer.base-layer x)))
  (randomize layer)
  (assert (torch.allclose (torch_lora_forward layer x) (reference layer x) :atol 1e-6))
  (with [e (pytest.raises PrimitiveError)]
    (torch_lora_forward layer (torch.randn 3 7)))
  (assert (in "torch_lora_forward: input must end with 8 features" (str e.value)))
  (assert (in "test_lisp_lora.hy:" (str e.value)))
  (with [e (pytest.raises PrimitiveError :match "lora_layer must be a LoRA layer")]
    (torch_lora_forward linear x))
  (with [e (pytest.raises PrimitiveError :match "rank must be a positive integer, got 0")]
    (torch_lora_linear 8 5 0 4.0)))


(defn test-apply-to-linear-trainable-params []
  (setv linear (torch_linear 6 4)
        layer (torch_lora_apply_to_linear linear 3 6))
  (assert (is layer.base-layer linear))  ; wrapped, not copied
  (assert (not linear.weight.requires-grad))
  (setv params (torch_lora_trainable_params layer)
        [A B _] (factors layer))
  (assert (= (len params) 2))
  (assert (and (is (get params 0) A) (is (get params 1) B)))
  (assert (= (list A.shape) [3 6]))
  (assert (= (list B.shape) [4 3]))
  (assert (not (.any B)))
  (with [e (pytest.raises PrimitiveError :match "linear_layer must be a linear layer")]
    (torch_lora_apply_to_linear layer 3 6)))


(defn test-delta-magnitude-merge []
  (setv layer (torch_lora_linear 6 4 2 2.0))
  (assert (= (torch_lora_get_adaptation_magnitude layer) 0.0))
  (randomize layer)
  (setv [A B _] (factors layer)
        delta (torch_lora_compute_delta layer)
        expected (* (get layer.scaling "default") (@ (.detach B) (.detach A)))
        w (.clone layer.base-layer.weight))
  (assert (torch.allclose delta expected :atol 1e-7))
  (setv magnitude (torch_lora_get_adaptation_magnitude layer))
  (assert (< (abs (- magnitude (/ (float (torch.linalg.norm expected)) (float (torch.linalg.norm w))))) 1e-6))
  (setv x (torch.randn 5 6)
        before (torch_lora_forward layer x))
  (assert (torch_lora_merge_weights layer))
  (assert layer.merged)
  (assert (torch.allclose layer.base-layer.weight (+ w expected) :atol 1e-6))
  (assert (torch.allclose (torch_lora_forward layer x) before :atol 1e-6))
  (assert (< (abs (- (torch_lora_get_adaptation_magnitude layer) magnitude)) 1e-5))
  ;; A model (a module holding LoRA layers) merges every layer.
  (setv model (torch.nn.Sequential (torch_lora_linear 4 4 2 2.0) (torch_lora_linear 4 4 2 2.0)))
  (torch_lora_merge_weights model)
  (assert (all (gfor l (.values (lt.adapter-layers model)) l.merged))))


(defn test-save-load-adapters [tmp-path]
  (setv layer (torch_lora_linear 6 4 2 2.0))
  (randomize layer)
  (setv path (str (/ tmp-path "adapters.safetensors"))
        x (torch.randn 3 6))
  (assert (= (torch_lora_save_adapters layer path) path))
  ;; Into another layer with the same base weight: the same outputs.
  (setv other (torch_lora_apply_to_linear layer.base-layer 2 2.0))
  (assert (torch_lora_load_adapters other path))
  (assert (torch.equal (torch_lora_forward other x) (torch_lora_forward layer x)))
  ;; Mismatched shapes are refused before anything changes.
  (setv wrong (torch_lora_linear 5 4 2 2.0)
        [A0 _ _] (factors wrong))
  (with [e (pytest.raises PrimitiveError :match "has A \\[2, 6\\] and B \\[4, 2\\], but the layer needs A \\[2, 5\\]")]
    (torch_lora_load_adapters wrong path))
  (assert (is (get (factors wrong) 0) A0))
  ;; A model's layers are saved under their names.
  (setv model (torch.nn.Sequential (torch_lora_linear 4 4 2 2.0) (torch_lora_linear 4 3 2 2.0)))
  (for [l (.values (lt.adapter-layers model))] (randomize l))
  (setv mpath (str (/ tmp-path "model.safetensors")))
  (torch_lora_save_adapters model mpath)
  (setv copy (torch.nn.Sequential (torch_lora_apply_to_linear (. (get model 0) base-layer) 2 2.0)
                                  (torch_lora_apply_to_linear (. (get model 1) base-layer) 2 2.0))
        y (torch.randn 2 4))
  (torch_lora_load_adapters copy mpath)
  (assert (torch.equal (copy y) (model y)))
  (with [e (pytest.raises PrimitiveError :match "holds no adapter for layer ''")]
    (torch_lora_load_adapters layer mpath)))


(defn test-forward-with-gradients []
  (setv layer (torch_lora_linear 6 4 2 2.0)
        x (torch.randn 3 6))
  (torch_set_grad_enabled False)
  (try
    (setv plain (torch_lora_forward layer x)
          out (torch_lora_forward_with_gradients layer x True))
    (finally (torch_set_grad_enabled True)))
  (assert (not plain.requires-grad))
  (assert out.requires-grad)
  (assert (torch.equal out plain))
  (torch_backward (.sum out))
  (assert (torch.equal out.grad (torch.ones-like out)))  ; retain_graph true keeps the output's gradient
  (setv [A B _] (factors layer))
  (assert (is-not B.grad None))
  (setv out2 (torch_lora_forward_with_gradients layer x False))
  (torch_backward (.sum out2))
  (assert out.retains-grad)
  (assert (not out2.retains-grad)))
