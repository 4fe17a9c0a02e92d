"The HF LoRA primitives, the tokenizer pair and generation, on the tiny default model."

(import os
        pytest
        torch
        transformers [AutoModelForCausalLM]
        lispetorch :as lt
        lispetorch.lisp *
        lispetorch.lisp.checks [PrimitiveError]
        lispetorch.lisp.hf [MODELS])


(defn base-logits [directory ids]
  "Logits of the model as transformers loads it, without lispetorch."
  (setv model (AutoModelForCausalLM.from-pretrained directory :dtype torch.float32))
  (.eval model)
  (with [_ (torch.no-grad)]
    (. (model (.unsqueeze ids 0)) logits)))


(defn no-grad-forward [name ids]
  (torch_set_grad_enabled False)
  (try
    (torch_hf_forward name ids)
    (finally (torch_set_grad_enabled True))))


(defn randomize [name]
  (with [_ (torch.no-grad)]
    (for [p (torch_hf_lora_get_parameters name)]
      (.copy- p (* 0.05 (torch.randn p.shape))))))


(setv IDS (torch.tensor [3 17 42 99 7 250 11 5 64 33]))


(defn test-load-init-forward-memory [tiny-default-model]
  (setv d (str tiny-default-model))
  (assert (= (torch_hf_load_model_lora "hf_a" d (dictionary "device" "cpu")) "hf_a"))
  (setv before (torch_hf_memory_usage "hf_a"))
  (assert (= (torch_hf_lora_init "hf_a" 4 8 (strings "q_proj" "k_proj" "v_proj" "o_proj") "float32") 8))
  (setv params (torch_hf_lora_get_parameters "hf_a"))
  (assert (= (len params) 16))
  (assert (all (gfor p params p.requires-grad)))
  ;; The adapters' bytes are counted, exactly.
  (assert (= (- (torch_hf_memory_usage "hf_a") before) (sum (gfor p params (* (.numel p) (.element-size p))))))
  ;; A fresh adapter (B = 0) leaves the model's logits as transformers computes them.
  (setv logits (no-grad-forward "hf_a" IDS))
  (assert (= (list logits.shape) [1 10 (. (torch_hf_model "hf_a") config vocab-size)]))
  (assert (torch.allclose logits (base-logits d IDS) :atol 1e-5))
  ;; Gradients enabled: training mode and a graph down to the adapters.
  (setv out (torch_hf_forward "hf_a" (.unsqueeze IDS 0)))
  (assert (. (torch_hf_model "hf_a") training))
  (assert out.requires-grad)
  (.backward (.sum out))
  (assert (all (gfor p params (is-not p.grad None)))))


(defn test-init-all-linear-dropout-dtype-and-replace [tiny-default-model]
  (torch_hf_load_model_lora "hf_b" (str tiny-default-model) (dictionary "device" "auto" "dtype" "float32"))
  (assert (= (torch_hf_lora_init "hf_b" 2 4 "all-linear" "bfloat16" :dropout 0.1) 14))  ; 7 linears × 2 layers
  (setv layer (get (lt.adapter-layers (torch_hf_model "hf_b")) "model.layers.0.mlp.down_proj"))
  (assert (= (get layer.lora-dropout "default") 0.1))
  (assert (= (. (get layer.lora-A "default") dtype) torch.bfloat16))
  ;; Again: the adapter is replaced, not doubled.
  (assert (= (torch_hf_lora_init "hf_b" 8 16 (strings "q_proj")) 2))
  (assert (= (lt.adapter-names (torch_hf_model "hf_b")) ["default"]))
  (assert (= (len (torch_hf_lora_get_parameters "hf_b")) 4)))


(defn test-save-load-merge-enable [tiny-default-model tmp-path]
  (setv d (str tiny-default-model))
  (torch_hf_load_model_lora "hf_c" d (dictionary "device" "cpu"))
  (torch_hf_lora_init "hf_c" 4 8 (strings "q_proj" "v_proj") "float32")
  (randomize "hf_c")
  (setv adapted (no-grad-forward "hf_c" IDS)
        base (base-logits d IDS))
  (assert (> (float (.max (.abs (- adapted base)))) 1e-3))

  ;; A PEFT adapter directory, loaded into another model of the same base: same logits.
  (setv path (str (/ tmp-path "adapters_epoch_1.pt")))
  (assert (= (torch_hf_lora_save "hf_c" path) path))
  (assert (os.path.isfile (os.path.join path "adapter_config.json")))
  (torch_hf_load_model_lora "hf_d" d (dictionary "device" "cpu"))
  (assert (= (torch_hf_lora_load "hf_d" path) 4))
  (assert (torch.equal (no-grad-forward "hf_d" IDS) adapted))

  ;; Merge: same outputs; unmerge: the exact weights back.
  (assert (torch_hf_lora_merge "hf_c"))
  (assert (lt.is-merged (torch_hf_model "hf_c")))
  (assert (torch.allclose (no-grad-forward "hf_c" IDS) adapted :atol 1e-5))
  ;; Disabling a merged model gives the base model (an exact unmerge), enabling merges again, as PEFT does.
  (assert (= (torch_hf_lora_enable "hf_c" False) False))
  (assert (not (lt.is-merged (torch_hf_model "hf_c"))))
  (assert (torch.allclose (no-grad-forward "hf_c" IDS) base :atol 1e-5))
  (assert (= (torch_hf_lora_enable "hf_c" True) True))
  (assert (lt.is-merged (torch_hf_model "hf_c")))
  (assert (torch.allclose (no-grad-forward "hf_c" IDS) adapted :atol 1e-5))
  (assert (torch_hf_lora_unmerge "hf_c"))
  (assert (torch.equal (no-grad-forward "hf_c" IDS) adapted))

  ;; Disabled: the base model's logits; enabled again: the adapter's.
  (assert (= (torch_hf_lora_enable "hf_c" False) False))
  (assert (torch.allclose (no-grad-forward "hf_c" IDS) base :atol 1e-5))
  (assert (= (torch_hf_lora_enable "hf_c" True) True))
  (assert (torch.equal (no-grad-forward "hf_c" IDS) adapted)))


(defn test-registry-and-argument-errors [tiny-default-model]
  (torch_hf_load_model_lora "hf_e" (str tiny-default-model) (dictionary "device" "cpu"))
  (with [e (pytest.raises PrimitiveError)]
    (torch_hf_forward "nope" IDS))
  (setv message (str e.value))
  (assert (in "torch_hf_forward: no model named 'nope'; loaded models:" message) message)
  (assert (in "'hf_e'" message) message)
  (assert (in "test_lisp_hf.hy:" message) message)  ; the calling line
  (with [e (pytest.raises PrimitiveError)]
    (torch_hf_lora_init "hf_e" "16" 32 (strings "q_proj")))
  (assert (in "torch_hf_lora_init: rank must be a positive integer, got '16' (a string)" (str e.value)))
  (with [e (pytest.raises PrimitiveError)]
    (torch_hf_lora_init "hf_e" 16))
  (assert (in "expects (torch_hf_lora_init model_name rank alpha target_modules (dtype) (dropout) (method) (options)), got 2 arguments"
              (str e.value)))
  (with [e (pytest.raises PrimitiveError :match "matches no adaptable module")]
    (torch_hf_lora_init "hf_e" 4 8 (strings "nothing_like_this")))
  (with [e (pytest.raises PrimitiveError :match "dtype must be one of")]
    (torch_hf_lora_init "hf_e" 4 8 (strings "q_proj") "int8"))
  (with [e (pytest.raises PrimitiveError :match "has no adapters: call torch_hf_lora_init first")]
    (torch_hf_lora_get_parameters "hf_e"))
  (with [e (pytest.raises PrimitiveError :match "input must hold integer token ids")]
    (torch_hf_forward "hf_e" (torch.ones 3)))
  (with [e (pytest.raises PrimitiveError :match "outside the vocabulary")]
    (torch_hf_forward "hf_e" (torch.tensor [1 100000])))
  (with [e (pytest.raises PrimitiveError :match "unknown config key 'devise'")]
    (torch_hf_load_model_lora "hf_f" (str tiny-default-model) (dictionary "devise" "cpu")))
  (with [e (pytest.raises PrimitiveError :match "unknown device 'gpu9'; available here: cpu")]
    (torch_hf_load_model_lora "hf_f" (str tiny-default-model) (dictionary "device" "gpu9")))
  (with [e (pytest.raises PrimitiveError :match "no model directory at")]
    (torch_hf_load_model_lora "hf_f" "/no/such/dir" (dictionary)))
  (with [e (pytest.raises PrimitiveError :match "no adapter directory at")]
    (torch_hf_lora_load "hf_e" "/no/such/adapter"))
  (assert (not-in "hf_f" MODELS)))


(defn test-tokenizer-round-trip [tiny-default-model]
  (setv tokenizer (torch_hf_load_tokenizer (str tiny-default-model))
        text "def add(a, b):\n    return a + b\n"
        ids (torch_encode tokenizer text))
  (assert (and (isinstance ids list) (all (gfor i ids (isinstance i int)))))
  (assert (= (torch_decode tokenizer ids) text))
  (assert (= (torch_decode tokenizer (torch.tensor ids)) text))
  (with [e (pytest.raises PrimitiveError :match "torch_encode: text must be a string")]
    (torch_encode tokenizer 42))
  (with [e (pytest.raises PrimitiveError :match "torch_decode: token_ids must be a list of integers")]
    (torch_decode tokenizer ["a"])))


(defn greedy-reference [model prompt max-length eos]
  "Greedy decoding by hand: the most likely next token until max_length or eos."
  (setv ids (list prompt))
  (with [_ (torch.no-grad)]
    (while (< (len ids) max-length)
      (setv next-id (int (.argmax (get (. (model (torch.tensor [ids])) logits) 0 -1))))
      (.append ids next-id)
      (when (= next-id eos) (break))))
  ids)


(defn test-generate [tiny-default-model]
  (torch_hf_load_model_lora "hf_g" (str tiny-default-model) (dictionary "device" "cpu"))
  (torch_hf_lora_init "hf_g" 4 8 (strings "q_proj" "v_proj"))
  (randomize "hf_g")
  (setv model (torch_hf_model "hf_g")
        prompt [5 9 13 21]
        eos model.generation-config.eos-token-id)
  (.eval model)
  (setv expected (greedy-reference model prompt 16 eos))
  (assert (= (torch_hf_generate "hf_g" prompt 16 (dictionary "greedy" true)) expected))
  ;; LispE's argument order (eos_id before max_length) gives the same.
  (assert (= (torch_hf_generate "hf_g" (torch.tensor prompt) eos 16 (dictionary "greedy" true)) expected))
  ;; Sampling narrowed to one token (top-k 1, or a tiny top-p) is greedy.
  (assert (= (torch_hf_generate "hf_g" prompt 16 (dictionary "topk" 1 "seed" 3)) expected))
  (assert (= (torch_hf_generate "hf_g" prompt 16 (dictionary "topp" 1e-9 "seed" 3)) expected))
  ;; Sampling is reproducible with a seed, and continues the prompt.
  (setv sampled (torch_hf_generate "hf_g" prompt 16 (dictionary "seed" 7 "temperature" 1.5)))
  (assert (= (cut sampled 0 4) prompt))
  (assert (= sampled (torch_hf_generate "hf_g" prompt 16 (dictionary "seed" 7 "temperature" 1.5))))
  (with [e (pytest.raises PrimitiveError :match "unknown options key 'beams'")]
    (torch_hf_generate "hf_g" prompt 16 (dictionary "beams" 4)))
  (with [e (pytest.raises PrimitiveError :match "leaves no room after the 4 prompt tokens")]
    (torch_hf_generate "hf_g" prompt 4)))


(defn test-generate-with-dora-keeps-the-row-scaling-while-it-runs [tiny-default-model]
  (torch_hf_load_model_lora "hf_gd" (str tiny-default-model) (dictionary "device" "cpu"))
  (torch_hf_lora_init "hf_gd" 4 8 (strings "q_proj" "v_proj") "float32" 0.0 "lora" (dictionary "use_dora" true))
  (setv model (torch_hf_model "hf_gd")
        prompt [5 9 13 21]
        eos model.generation-config.eos-token-id
        layers (list (.values (lt.adapter-layers model))))
  (with [_ (torch.no-grad)]
    (for [layer layers]
      (.normal- (get layer.lora-B "default") 0 0.05 :generator (.manual-seed (torch.Generator) 3))
      (.normal- (. layer base-layer weight) 0 0.2 :generator (.manual-seed (torch.Generator) 4))))
  (.eval model)
  (setv expected (greedy-reference model prompt 16 eos))  ; the norms computed at every forward
  (setv seen [])
  (defn watch [module args output]
    (.append seen (bool module.dora-cache)))
  (setv hook (.register-forward-hook (get layers 0) watch))
  (assert (= (torch_hf_generate "hf_gd" prompt 16 (dictionary "greedy" true)) expected))
  (.remove hook)
  ;; kept from the second forward on, and dropped after
  (assert (and (> (len seen) 1) (all (cut seen 1 None))))
  (assert (all (gfor layer layers (and (not layer.dora-caching) (not layer.dora-cache))))))


(defn test-merge-and-unload-and-loraplus-optimizer [tiny-default-model tmp-path]
  (setv d (str tiny-default-model))
  (torch_hf_load_model_lora "hf_mu" d (dictionary "device" "cpu"))
  (assert (= (torch_hf_lora_init "hf_mu" 4 8 (strings "q_proj" "v_proj") "float32" 0.0 "lora"
                                 (dictionary "layers_to_transform" [1] "rank_pattern" (dictionary "v_proj" 2)))
             2))
  (setv opt (torch_hf_lora_optimizer "hf_mu" 1e-3 0.0 16))
  (assert (= (sorted (gfor g opt.param-groups (get g "lr"))) [1e-3 16e-3]))
  (with [e (pytest.raises PrimitiveError :match "torch_hf_lora_optimizer.*loraplus_lr_ratio")]
    (torch_hf_lora_optimizer "hf_mu" 1e-3 0.0 0))
  (randomize "hf_mu")
  (setv adapted (no-grad-forward "hf_mu" IDS))
  (assert (= (torch_hf_lora_merge_and_unload "hf_mu" (str (/ tmp-path "merged"))) 2))
  (assert (not (lt.adapter-layers (torch_hf_model "hf_mu"))))
  (assert (torch.allclose (no-grad-forward "hf_mu" IDS) adapted :atol 1e-5))
  (assert (torch.allclose (base-logits (str (/ tmp-path "merged")) IDS) adapted :atol 1e-5))
  (with [e (pytest.raises PrimitiveError :match "torch_hf_lora_merge_and_unload.*no adapters")]
    (torch_hf_lora_merge_and_unload "hf_mu")))


(defn test-hotswap [tiny-default-model tmp-path]
  (setv d (str tiny-default-model))
  (torch_hf_load_model_lora "hf_hs" d (dictionary "device" "cpu"))
  (torch_hf_lora_init "hf_hs" 4 8 (strings "q_proj" "v_proj") "float32")
  (randomize "hf_hs")
  (setv first (no-grad-forward "hf_hs" IDS))
  (torch_hf_lora_save "hf_hs" (str (/ tmp-path "a")))
  (randomize "hf_hs")
  (assert (not (torch.allclose (no-grad-forward "hf_hs" IDS) first :atol 1e-4)))
  (assert (= (torch_hf_lora_hotswap "hf_hs" (str (/ tmp-path "a"))) (str (/ tmp-path "a"))))
  (assert (torch.allclose (no-grad-forward "hf_hs" IDS) first :atol 1e-6))
  (with [e (pytest.raises PrimitiveError :match "torch_hf_lora_hotswap")]
    (torch_hf_lora_hotswap "hf_hs" (str (/ tmp-path "missing")))))
