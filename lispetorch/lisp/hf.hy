"Hugging Face models by name (LispE's HF LoRA API), their tokenizer, and generation.

Models live in a registry by name, as in LispE: ``torch_hf_load_model_lora`` loads a model directory
(``AutoModelForCausalLM.from_pretrained``) under a name, and every other ``torch_hf_*`` primitive takes that
name. An unknown name is an error that lists the loaded names.

Adapters are lispetorch's LoRA layers (:func:`lispetorch.inject`); the forward pass is the model's own, so
RoPE, attention masks and every other detail of the architecture apply. Adapter files are PEFT adapter
directories (``adapter_config.json`` + ``adapter_model.safetensors``): a LispE-style name such as
``adapters_epoch_1.pt`` becomes the directory's name.

Examples::

    (torch_hf_load_model_lora \"m\" \"/path/to/model\" (dictionary \"device\" \"cpu\"))
    (torch_hf_lora_init \"m\" 16 32 (strings \"q_proj\" \"k_proj\" \"v_proj\" \"o_proj\") \"float32\")
    (setq logits (torch_hf_forward \"m\" (tensor_create (integers 1 2 3))))   ; (1, 3, vocab)
    (torch_hf_lora_save \"m\" \"checkpoints/adapters_epoch_1.pt\")
"

(import os
        torch
        lispetorch :as lt
        lispetorch.adapters
        lispetorch.atomic
        lispetorch.hf [DTYPES]
        lispetorch.hf
        lispetorch.config
        lispetorch.lisp.checks [primitive fail describe check-int check-number check-bool check-tensor
                                check-string check-dict]
        lispetorch.lisp.tensors [resolve-device])

(setv ADAPTER "default"
      LOAD-KEYS #("device" "dtype")
      GENERATE-KEYS #("greedy" "topk" "top_k" "topp" "top_p" "temperature" "seed" "eos_id"))


(defclass Entry []
  "A loaded model: the transformers model, where it came from, and the device it is on."
  (defn __init__ [self model path device]
    (setv self.model model
          self.path path
          self.device device)))

(setv MODELS {})


(defn entry [primitive name]
  "The registry entry of ``name``; an unknown name is an error listing the loaded names."
  (check-string primitive "model name" name)
  (when (not-in name MODELS)
    (fail primitive (if MODELS
                        f"no model named {(repr name)}; loaded models: {(.join ", " (map repr MODELS))}"
                        f"no model named {(repr name)}; no model is loaded (load one with torch_hf_load_model_lora)")))
  (get MODELS name))


(defn _model-dir [primitive path]
  (check-string primitive "path" path)
  (when (not (os.path.isdir path))
    (fail primitive f"no model directory at {(repr path)}"))
  (when (not (os.path.isfile (os.path.join path "config.json")))
    (fail primitive f"{(repr path)} is not a Hugging Face model directory (it has no config.json)"))
  path)


(defn _dtype [primitive what value]
  (when (is value None) (return None))
  (when (or (not (isinstance value str)) (not-in value DTYPES))
    (fail primitive f"{what} must be one of {(.join ", " DTYPES)}, got {(describe value)}"))
  (lispetorch.hf.parse-dtype value))


;; --- loading, adapters ----------------------------------------------------------------------------------
(defn [primitive] torch-hf-load-model-lora [model-name path config]
  "Loads the Hugging Face causal language model in directory ``path`` under ``model_name`` (replacing a model
  of that name). ``config`` keys: ``device`` (cpu, cuda, cuda:N, mps or auto; default auto) and ``dtype``
  (float32, bfloat16, float16; default float32). Returns the name."
  (import transformers [AutoModelForCausalLM])
  (check-string "torch_hf_load_model_lora" "model_name" model-name)
  (_model-dir "torch_hf_load_model_lora" path)
  (setv config (check-dict "torch_hf_load_model_lora" "config" config LOAD-KEYS)
        device (resolve-device "torch_hf_load_model_lora" (.get config "device" "auto"))
        dtype (or (_dtype "torch_hf_load_model_lora" "dtype" (.get config "dtype")) torch.float32))
  (.pop MODELS model-name None)
  (setv model (.to (AutoModelForCausalLM.from-pretrained path :dtype dtype) device))
  (.eval model)
  (setv (get MODELS model-name) (Entry model path device))
  model-name)


(defn [primitive] torch-hf-lora-init [model-name rank alpha target-modules [dtype None] [dropout 0.0]
                                      [method "lora"] [options None]]
  "Adds LoRA adapters of rank ``rank`` and scaling ``alpha / rank`` to the layers ``target_modules`` names
  (a list of module names such as ``q_proj``, or ``\"all-linear\"``), with factors in ``dtype`` (default: the
  model's) and ``dropout`` on the adapter input. Everything else is frozen. Calling it again replaces the
  adapter. ``method`` picks the adapter family: ``\"lora\"`` (default), ``\"pissa\"``, ``\"pissa_niter_K\"``,
  ``\"lora_ga\"`` (``options`` must hold ``calibration_batches``: token-id tensors), ``\"rotational_pissa\"``
  (``options``: ``method`` way0…way3, ``orthogonality_reg_weight``, …) or ``\"tinylora\"`` (``options``: ``u``,
  ``seed``, ``groups``). With ``\"lora\"``, ``options`` may hold ``target_parameters``: the expert weights of a
  mixture-of-experts model to adapt, one adapter per expert (``[\"gate_up_proj\" \"down_proj\"]``; with
  ``target_modules`` ``[]``, the experts alone). Returns the number of layers adapted."
  (setv model (. (entry "torch_hf_lora_init" model-name) model)
        rank (check-int "torch_hf_lora_init" "rank" rank 1)
        alpha (check-number "torch_hf_lora_init" "alpha" alpha :positive True)
        dtype (_dtype "torch_hf_lora_init" "dtype" dtype)
        dropout (check-number "torch_hf_lora_init" "dropout" dropout))
  (setv options (dict (check-dict "torch_hf_lora_init" "options" options)))
  (when (not (or (isinstance target-modules str)
                 (and (isinstance target-modules #(list tuple))
                      (or target-modules (.get options "target_parameters"))  ; [] : the experts alone
                      (all (gfor t target-modules (isinstance t str))))))
    (fail "torch_hf_lora_init"
          f"target_modules must be a list of module names or \"all-linear\", got {(describe target-modules)}"))
  (check-string "torch_hf_lora_init" "method" method)
  (setv batches (.pop options "calibration_batches" None)
        config (if (= method "lora")
                   (lt.LoraConfig :r rank :alpha alpha :dropout dropout :target-modules target-modules :dtype dtype
                                  #** options)
                   (lispetorch.config.method-config method rank alpha target-modules dtype dropout #** options)))
  (when (in ADAPTER (lt.adapter-names model))
    (lt.delete-adapter model ADAPTER))
  (len (lt.inject model config :adapter-name ADAPTER :calibration-batches batches)))


(defn [primitive] torch-hf-lora-get-parameters [model-name]
  "The adapter parameters that train (A and B of every adapted layer), as a list of tensors."
  (setv model (. (entry "torch_hf_lora_get_parameters" model-name) model))
  (when (not (lt.adapter-layers model))
    (fail "torch_hf_lora_get_parameters" f"model {(repr model-name)} has no adapters: call torch_hf_lora_init first"))
  (lt.trainable-parameters model))


(defn _ids [primitive entry input]
  (when (isinstance input #(list tuple))
    (setv input (torch.tensor input)))
  (check-tensor primitive "input" input)
  (when (or (torch.is-floating-point input) (= input.dtype torch.bool))
    (fail primitive f"input must hold integer token ids, got {(describe input)}"))
  (when (not (in input.ndim #(1 2)))
    (fail primitive f"input must be (seq) or (batch, seq) token ids, got {(describe input)}"))
  (setv vocab (. entry model config vocab-size))
  (when (and (.numel input) (or (< (int (.min input)) 0) (>= (int (.max input)) vocab)))
    (fail primitive f"input holds token ids outside the vocabulary [0, {vocab})"))
  (.to (if (= input.ndim 1) (.unsqueeze input 0) input) entry.device :dtype torch.long))


(defn [primitive] torch-hf-forward [model-name input]
  "The logits ``(batch, seq, vocab)`` of the model for token ids ``input`` ``(seq)`` or ``(batch, seq)``,
  adapters applied. The model runs in training mode while gradients are enabled and in evaluation mode
  when ``torch_set_grad_enabled`` turned them off."
  (setv e (entry "torch_hf_forward" model-name)
        ids (_ids "torch_hf_forward" e input)
        training (torch.is-grad-enabled))
  (when (!= e.model.training training)
    (.train e.model training))
  (. (e.model ids) logits))


(defn [primitive] torch-hf-lora-save [model-name path]
  "Writes the model's adapter to ``path`` as a PEFT adapter directory, atomically. Returns the path."
  (setv model (. (entry "torch_hf_lora_save" model-name) model))
  (check-string "torch_hf_lora_save" "path" path)
  (str (lt.save-adapter model path)))


(defn [primitive] torch-hf-lora-load [model-name path]
  "Loads the PEFT adapter directory ``path`` into the model, replacing its adapter (LispE's adapter
  switching; the model's layers are adapted if they were not). Returns the number of layers loaded.
  The loaded factors are new tensors: fetch them again with ``torch_hf_lora_get_parameters`` to train them."
  (setv model (. (entry "torch_hf_lora_load" model-name) model))
  (check-string "torch_hf_lora_load" "path" path)
  (when (not (os.path.isdir path))
    (fail "torch_hf_lora_load" f"no adapter directory at {(repr path)}"))
  (len (lt.load-adapter model path :adapter-name (or (lt.active-adapter model) ADAPTER))))


(defn [primitive] torch-hf-lora-merge [model-name]
  "Folds the adapter into the base weights: same outputs, no adapter cost at inference. Returns true."
  (lt.merge (. (entry "torch_hf_lora_merge" model-name) model))
  True)


(defn [primitive] torch-hf-lora-unmerge [model-name]
  "Takes the adapter back out of the base weights (bit-exact), e.g. to train on. Returns true."
  (lt.unmerge (. (entry "torch_hf_lora_unmerge" model-name) model))
  True)


(defn [primitive] torch-hf-lora-merge-and-unload [model-name [path None]]
  "Folds the active adapter into the base weights and takes the adapter layers out: the model under
  ``model_name`` becomes the plain transformers model, with the adapted model's outputs
  (:func:`lispetorch.merge_and_unload`). With ``path``, also writes it there as a Hugging Face model directory
  (``save_pretrained``), atomically. Returns the number of layers merged."
  (setv model (. (entry "torch_hf_lora_merge_and_unload" model-name) model)
        n (len (lt.adapter-layers model)))
  (when (not n)
    (fail "torch_hf_lora_merge_and_unload" f"model {(repr model-name)} has no adapters to merge"))
  (when (is-not path None)
    (check-string "torch_hf_lora_merge_and_unload" "path" path))
  (lt.merge-and-unload model)
  (when (is-not path None)
    (with [tmp (lispetorch.atomic.directory path)]
      (.save-pretrained model tmp)))
  n)


(defn [primitive] torch-hf-lora-hotswap [model-name path]
  "Loads the PEFT adapter directory ``path`` into the model's active adapter in place (same modules, rank up to
  the adapter's): a compiled model runs it without recompiling (:func:`lispetorch.hotswap_adapter`). Returns the
  path."
  (setv model (. (entry "torch_hf_lora_hotswap" model-name) model))
  (check-string "torch_hf_lora_hotswap" "path" path)
  (lt.hotswap-adapter model path)
  path)


(defn [primitive] torch-hf-lora-optimizer [model-name learning-rate weight-decay [loraplus-lr-ratio 1.0]]
  "An AdamW optimizer over the model's trainable parameters, B at ``loraplus_lr_ratio`` times the learning rate
  of A (LoRA+; 1.0: plain LoRA), from :func:`lispetorch.optimizer_param_groups`."
  (setv model (. (entry "torch_hf_lora_optimizer" model-name) model))
  (when (not (lt.trainable-parameters model))
    (fail "torch_hf_lora_optimizer" f"model {(repr model-name)} has nothing to train: call torch_hf_lora_init first"))
  (torch.optim.AdamW (lt.optimizer-param-groups model
                                                (check-number "torch_hf_lora_optimizer" "learning_rate" learning-rate
                                                              :positive True)
                                                :loraplus-lr-ratio (check-number "torch_hf_lora_optimizer"
                                                                                 "loraplus_lr_ratio"
                                                                                 loraplus-lr-ratio :positive True)
                                                :weight-decay (check-number "torch_hf_lora_optimizer" "weight_decay"
                                                                            weight-decay))))


(defn [primitive] torch-hf-lora-enable [model-name enable]
  "Turns the adapters on (true) or off (false: the base model's outputs), as PEFT's enable/disable do. On a
  merged model, disabling unmerges exactly (the base weights come back bit for bit) and enabling merges again;
  otherwise no weight changes. Returns the new state."
  (setv model (. (entry "torch_hf_lora_enable" model-name) model)
        flag (check-bool "torch_hf_lora_enable" "enable" enable))
  (lt.set-enabled model flag)
  flag)


(defn [primitive] torch-hf-memory-usage [model-name]
  "Bytes held by the model's parameters and buffers, adapters included."
  (lt.memory-usage (. (entry "torch_hf_memory_usage" model-name) model)))


(defn [primitive] torch-hf-model [model-name]
  "The transformers model loaded under ``model_name``, for whatever the primitives do not cover."
  (. (entry "torch_hf_model" model-name) model))


;; --- tokenizer ------------------------------------------------------------------------------------------
(defn [primitive] torch-hf-load-tokenizer [path]
  "The tokenizer of the model directory ``path`` (``AutoTokenizer.from_pretrained``)."
  (import transformers [AutoTokenizer])
  (check-string "torch_hf_load_tokenizer" "path" path)
  (when (not (os.path.isdir path))
    (fail "torch_hf_load_tokenizer" f"no tokenizer directory at {(repr path)}"))
  (AutoTokenizer.from-pretrained path))


(defn _tokenizer [primitive value]
  (when (not (and (hasattr value "encode") (hasattr value "decode") (hasattr value "eos_token_id")))
    (fail primitive f"tokenizer must be a tokenizer (from torch_hf_load_tokenizer), got {(describe value)}"))
  value)


(defn [primitive] torch-encode [tokenizer text]
  "The token ids of ``text`` (a list of integers), with the tokenizer's own special tokens."
  (.encode (_tokenizer "torch_encode" tokenizer) (check-string "torch_encode" "text" text) :verbose False))


(defn [primitive] torch-decode [tokenizer token-ids]
  "The text of ``token_ids`` (a list of integers or a 1-D tensor), special tokens left out."
  (setv tok (_tokenizer "torch_decode" tokenizer))
  (when (isinstance token-ids torch.Tensor)
    (when (> token-ids.ndim 1)
      (fail "torch_decode" f"token_ids must be one sequence, got {(describe token-ids)}"))
    (setv token-ids (.tolist token-ids)))
  (when (not (and (isinstance token-ids #(list tuple))
                  (all (gfor t token-ids (and (isinstance t int) (not (isinstance t bool)))))))
    (fail "torch_decode" f"token_ids must be a list of integers, got {(describe token-ids)}"))
  (.decode tok token-ids :skip-special-tokens True))


;; --- generation -----------------------------------------------------------------------------------------
(defn [primitive] torch-hf-generate [model-name ids #* rest]
  "Continues the token ids ``ids`` up to ``max_length`` tokens in all; returns prompt and continuation as a
  list of integers. Called as ``(torch_hf_generate name ids max_length (options))`` or, as in LispE,
  ``(torch_hf_generate name ids eos_id max_length (options))``. Options: ``greedy`` (true: the most likely
  token each time), ``topk``/``top_k``, ``topp``/``top_p``, ``temperature``, ``seed``, ``eos_id``. Without
  ``greedy`` it samples (from the whole distribution unless top-k or top-p narrow it)."
  (setv e (entry "torch_hf_generate" model-name)
        prompt (_ids "torch_hf_generate" e ids))
  (when (!= (get prompt.shape 0) 1)
    (fail "torch_hf_generate" f"ids must be one sequence, got {(describe ids)}"))
  (setv eos None
        options None)
  (cond (and (>= (len rest) 2) (isinstance (get rest 1) int) (not (isinstance (get rest 1) bool)))
          (setv [eos max-length #* more] rest)
        rest (setv [max-length #* more] rest)
        True (fail "torch_hf_generate" "expects (torch_hf_generate model_name ids max_length (options))"))
  (when (> (len more) 1)
    (fail "torch_hf_generate" f"expects at most one options dictionary after max_length, got {(len more)} arguments"))
  (setv options (check-dict "torch_hf_generate" "options" (if more (get more 0) None) GENERATE-KEYS)
        max-length (check-int "torch_hf_generate" "max_length" max-length 1)
        eos (if (in "eos_id" options) (get options "eos_id") eos))
  (when (<= max-length (get prompt.shape 1))
    (fail "torch_hf_generate" f"max_length {max-length} leaves no room after the {(get prompt.shape 1)} prompt tokens"))
  (setv greedy (check-bool "torch_hf_generate" "greedy" (.get options "greedy" False))
        top-k (.get options "topk" (.get options "top_k" 0))
        top-p (.get options "topp" (.get options "top_p" 1.0))
        gen e.model.generation-config
        pad (cond (is-not eos None) (check-int "torch_hf_generate" "eos_id" eos 0)
                  (is-not gen.pad-token-id None) gen.pad-token-id
                  True gen.eos-token-id)
        kwargs {"max_length" max-length "do_sample" (not greedy) "pad_token_id" pad})
  (when (is-not eos None)
    (setv (get kwargs "eos_token_id") eos))
  (when (not greedy)
    (.update kwargs {"top_k" (check-int "torch_hf_generate" "topk" top-k 0)
                     "top_p" (check-number "torch_hf_generate" "topp" top-p :positive True)
                     "temperature" (check-number "torch_hf_generate" "temperature"
                                                 (.get options "temperature" 1.0) :positive True)}))
  (when (in "seed" options)
    (torch.manual-seed (check-int "torch_hf_generate" "seed" (get options "seed") 0)))
  (setv was-training e.model.training)
  (.eval e.model)
  (try
    ;; DoRA layers keep their row scaling from one token to the next
    (with [_ (lispetorch.adapters.caching-while-generating e.model)]
      (setv out (e.model.generate prompt :attention-mask (torch.ones-like prompt) #** kwargs)))
    (finally
      (.train e.model was-training)))
  (.tolist (get out 0)))


(export :objects [torch-hf-load-model-lora torch-hf-lora-init torch-hf-lora-get-parameters torch-hf-forward
                  torch-hf-lora-save torch-hf-lora-load torch-hf-lora-merge torch-hf-lora-unmerge
                  torch-hf-lora-merge-and-unload torch-hf-lora-optimizer torch-hf-lora-hotswap
                  torch-hf-lora-enable torch-hf-memory-usage torch-hf-model torch-hf-load-tokenizer torch-encode
                  torch-decode torch-hf-generate])
