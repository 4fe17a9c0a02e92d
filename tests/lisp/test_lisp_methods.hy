"The SVD-family methods through torch_hf_lora_init's method option, their extra primitives, NF4, and the
checkpoint optimizer, on the tiny default model."

(import os
        json
        pytest
        torch
        transformers [AutoModelForCausalLM]
        peft [PeftModel]
        lispetorch :as lt
        lispetorch.lisp *
        lispetorch.lisp.checks [PrimitiveError])


(setv IDS (torch.tensor [3 17 42 99 7 250 11 5 64 33]))
(setv QKVO ["q_proj" "k_proj" "v_proj" "o_proj"])


(defn logits-of [name]
  (torch_set_grad_enabled False)
  (try
    (torch_hf_forward name IDS)
    (finally (torch_set_grad_enabled True))))


(defn base-logits [directory]
  (setv model (.eval (AutoModelForCausalLM.from-pretrained directory :dtype torch.float32)))
  (with [_ (torch.no-grad)]
    (. (model (.unsqueeze IDS 0)) logits)))


(defn test-pissa-keeps-the-output-and-saves-as-plain-lora [tiny-default-model tmp-path]
  (setv d (str tiny-default-model))
  (torch_hf_load_model_lora "me_p" d (dictionary "device" "cpu"))
  (assert (= (torch_hf_lora_init "me_p" 4 8 QKVO "float32" 0.0 "pissa") 8))
  (setv base (base-logits d))
  (assert (torch.allclose (logits-of "me_p") base :atol 1e-4))
  ;; Train the principal factors a little, then save as a plain LoRA on the original weights: PEFT agrees.
  (with [_ (torch.no-grad)]
    (for [p (torch_hf_lora_get_parameters "me_p")]
      (.add- p (* 0.01 (torch.randn p.shape)))))
  (setv ours (logits-of "me_p"))
  (assert (not (torch.allclose ours base :atol 1e-4)))
  (setv out (torch_hf_lora_save_as_lora "me_p" (str (/ tmp-path "plain"))))
  (setv peft-model (.eval (PeftModel.from-pretrained (AutoModelForCausalLM.from-pretrained d) out)))
  (with [_ (torch.no-grad)]
    (assert (torch.allclose (. (peft-model (.unsqueeze IDS 0)) logits) ours :atol 1e-4))))


(defn test-lora-ga-takes-calibration-batches [tiny-default-model]
  (torch_hf_load_model_lora "me_g" (str tiny-default-model) (dictionary "device" "cpu"))
  (with [e (pytest.raises PrimitiveError)]
    (torch_hf_lora_init "me_g" 2 4 QKVO "float32" 0.0 "lora_ga"))
  (assert (in "torch_hf_lora_init" (str e.value)))
  (setv batches [(torch.randint 0 500 #(2 12)) (torch.randint 0 500 #(2 12))])
  (assert (= (torch_hf_lora_init "me_g" 2 4 QKVO "float32" 0.0 "lora_ga"
                                 (dictionary "calibration_batches" batches)) 8))
  (assert (torch.allclose (logits-of "me_g") (base-logits (str tiny-default-model)) :atol 1e-4)))


(defn test-rotational-pissa-way0-penalty [tiny-default-model]
  (torch_hf_load_model_lora "me_r" (str tiny-default-model) (dictionary "device" "cpu"))
  (assert (= (torch_hf_lora_init "me_r" 4 4 QKVO "float32" 0.0 "rotational_pissa"
                                 (dictionary "method" "way0" "orthogonality_reg_weight" 0.5)) 8))
  (setv penalty (torch_hf_lora_orthogonality_loss "me_r"))
  (assert (= (.item penalty) 0.0))  ; the rotations start at the identity
  (with [_ (torch.no-grad)]
    (for [p (torch_hf_lora_get_parameters "me_r")]
      (.add- p (* 0.05 (torch.randn p.shape)))))
  (setv penalty (torch_hf_lora_orthogonality_loss "me_r"))
  (assert (> (.item penalty) 0))
  (.backward penalty)
  (assert (any (gfor p (torch_hf_lora_get_parameters "me_r") (and (is-not p.grad None) (> (.abs (.sum p.grad)) 0)))))
  (with [e (pytest.raises PrimitiveError)]
    (torch_hf_lora_init "me_r" 4 4 QKVO "float32" 0.0 "rotational_pissa" (dictionary "method" "way9")))
  (assert (in "way9" (str e.value))))


(defn test-tinylora-save-and-restore [tiny-default-model tmp-path]
  (setv d (str tiny-default-model))
  (torch_hf_load_model_lora "me_t" d (dictionary "device" "cpu"))
  (torch_hf_lora_init "me_t" 2 2 QKVO "float32" 0.0 "tinylora" (dictionary "u" 3 "seed" 5))
  (setv params (torch_hf_lora_get_parameters "me_t"))
  (assert (= (sum (gfor p params (.numel p))) 3))
  (with [_ (torch.no-grad)]
    (.copy- (get params 0) (torch.tensor [0.3 -0.2 0.1])))
  (setv want (logits-of "me_t"))
  (setv path (torch_hf_tinylora_save "me_t" (str (/ tmp-path "tiny_lora_v.pt"))))
  (assert (= (set (.keys (torch.load path :weights-only True)))
             #{"global_v" "u_value" "rank" "seed" "model_id" "total_replaced_layers"}))
  (torch_hf_load_model_lora "me_t2" d (dictionary "device" "cpu"))
  (assert (= (torch_hf_tinylora_restore "me_t2" path QKVO) 8))
  (assert (torch.equal (logits-of "me_t2") want)))


(defn test-nf4-base-trains-under-an-adapter [tiny-default-model]
  (torch_hf_load_model_lora "me_n" (str tiny-default-model) (dictionary "device" "cpu"))
  (setv before (torch_hf_memory_usage "me_n"))
  (assert (= (torch_hf_quantize_nf4 "me_n" QKVO) 8))
  (assert (< (torch_hf_memory_usage "me_n") before))
  (torch_hf_lora_init "me_n" 2 4 QKVO "float32")
  (setv out (torch_hf_forward "me_n" (.unsqueeze IDS 0)))
  (.backward (.sum out))
  (assert (all (gfor p (torch_hf_lora_get_parameters "me_n") (is-not p.grad None))))
  (with [e (pytest.raises PrimitiveError)]
    (torch_hf_quantize_nf4 "me_n" QKVO "yes"))
  (assert (in "double_quant" (str e.value))))


(defn save-adapter [directory name seed]
  "A trained-looking LoRA checkpoint of the tiny model: random A and B."
  (setv model (AutoModelForCausalLM.from-pretrained directory))
  (lt.inject model (lt.LoraConfig :r 2 :alpha 4 :target-modules QKVO))
  (setv g (.manual-seed (torch.Generator) seed))
  (with [_ (torch.no-grad)]
    (for [p (lt.trainable-parameters model)]
      (.copy- p (* 0.1 (torch.randn p.shape :generator g)))))
  (str (lt.save-adapter model name)))


(defn test-combine-optimize-and-build [tiny-default-model tmp-path]
  (setv d (str tiny-default-model)
        ckpts (dictionary "a" (save-adapter d (/ tmp-path "a") 1) "b" (save-adapter d (/ tmp-path "b") 2)))
  ;; The target is an exact convex combination of a and b: 0.3 a + 0.7 b, built with cat mode.
  (setv target (get (torch_lora_combine_build ckpts (dictionary "a" 0.3 "b" 0.7) (str (/ tmp-path "t"))) "output_dir"))
  (setv (get ckpts "t") (str target))
  (setv result (torch_lora_combine_optimize ckpts "t"))
  (assert (< (abs (- (get result "weights" "a") 0.3)) 1e-6))
  (assert (< (abs (- (get result "weights" "b") 0.7)) 1e-6))
  (assert (< (get result "evaluation" "relative_error") 1e-6))
  (del (get ckpts "t"))
  (setv built (torch_lora_combine_build ckpts result (str (/ tmp-path "svd")) "svd" 2))
  (assert (os.path.isfile (os.path.join (get built "output_dir") "adapter_model.safetensors")))
  (with [e (pytest.raises PrimitiveError)]
    (torch_lora_combine_optimize ckpts "nope"))
  (assert (in "torch_lora_combine_optimize" (str e.value)))
  (with [e (pytest.raises PrimitiveError)]
    (torch_lora_combine_build ckpts result (str (/ tmp-path "x")) "svd" 0))
  (assert (in "rank" (str e.value))))
