"The guide's complete training pipeline, its code blocks as written, run as a script on the tiny default model."

(import json
        math
        os
        pathlib [Path]
        sysconfig
        torch
        lispetorch :as lt
        lispetorch.lisp.hf [MODELS]
        lispetorch.lisp.runner [execute])

(setv HERE (. (Path __file__) parent))


(defn assemble [directory]
  "The script: setup (model path, data, loss), the guide's blocks unchanged, then the training loop."
  (setv script (/ directory "pipeline.lisp"))
  (.write-text script (.join "\n" (lfor name ["pipeline_setup.lisp" "guide_pipeline.lisp" "pipeline_run.lisp"]
                                        (.read-text (/ HERE name) :encoding "utf-8"))))
  script)


(defn test-guide-pipeline-runs-as-written [tiny-default-model tmp-path capfd]
  (setv checkpoints (/ tmp-path "checkpoints"))
  (.mkdir checkpoints)
  (setv corpus (os.path.join (get (sysconfig.get-paths) "stdlib") "json" "decoder.py"))
  (setv g (execute (assemble tmp-path) [(str tiny-default-model) (str checkpoints) corpus]))
  (setv [out err] (.readouterr capfd))
  (assert (in "LoRA parameters: 16 tensors" out) out)  ; q,k,v,o × 2 layers × (A, B)
  (assert (in "device 'mps' is not available here" err) err)

  ;; 16 micro-steps with accumulation 4: 4 optimizer updates, and the schedule followed them.
  (assert (= (get g "global_step") 4))
  (assert (= (len (get g "train_losses")) 16))
  (assert (all (gfor x (get g "train_losses") (math.isfinite x))))
  (setv config {"initial_lr" 2e-4 "min_lr" 1e-6 "total_steps" 4 "warmup_steps" 100})
  (assert (= (lt.train.lr-at "linear_warmup_cosine" 4 config)
             (get (. (get g "optimizer") param-groups) 0 "lr")))

  ;; The updates reached the adapters (B starts at zero), in the dtype the guide asked for.
  (setv params (get g "lora_params"))
  (assert (all (gfor p params (= p.dtype torch.bfloat16))))
  (assert (any (gfor p params (.any (!= p 0)))))
  (setv model (. (get MODELS "llama31_lora") model))
  (assert (all (gfor [n p] (.named-parameters model) (= p.requires-grad (in "lora_" n)))))

  ;; Validation: gradients back on, and the losses are the model's real next-token losses.
  (assert (torch.is-grad-enabled))
  (setv [v1 v2] (get g "validation_losses"))
  (assert (and (math.isfinite v1) (math.isfinite v2)))
  (setv ids (.unsqueeze (get (get g "validation_samples") 0) 0))
  (.eval model)
  (with [_ (torch.no-grad)]
    (setv expected (float (. (model ids :labels ids) loss))))
  (assert (< (abs (- v2 expected)) 1e-4) [v2 expected])

  ;; Checkpoints: PEFT adapter directories plus their JSON metadata, one per epoch.
  (for [epoch [1 2]]
    (setv adapter (/ checkpoints f"lora_adapters_epoch_{epoch}.pt"))
    (assert (.is-file (/ adapter "adapter_config.json")))
    (assert (.is-file (/ adapter "adapter_model.safetensors")))
    (setv info (json.loads (.read-text (/ checkpoints f"training_info_epoch_{epoch}.json"))))
    (assert (= (get info "epoch") epoch))
    (assert (= (get info "lora_config")
               {"rank" 16 "alpha" 32 "target_modules" ["q_proj" "k_proj" "v_proj" "o_proj"]}))
    (assert (= (get info "training_config" "scheduler_type") "linear_warmup_cosine")))

  ;; The last checkpoint is the trained adapter: loading it back changes nothing.
  (with [_ (torch.no-grad)]
    (setv before (. (model ids) logits))
    (lt.load-adapter model (/ checkpoints "lora_adapters_epoch_2.pt"))
    (setv after (. (model ids) logits)))
  (assert (torch.equal before after)))
