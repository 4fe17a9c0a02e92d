"Training primitives: optimizer, gradients, learning-rate schedules, gradient mode, device synchronisation.

``torch_optimizer_add_params`` makes an AdamW optimizer; ``torch_lr_scheduler`` follows LispE's schedules with
LispE's config keys (``initial_lr``, ``min_lr``, ``total_steps``, ``warmup_steps``, ``gamma``, ``step_size``),
through :func:`lispetorch.train.make_scheduler`.

Examples::

    (setq optimizer (torch_optimizer_add_params lora_params 2e-4 0.01))
    (setq scheduler (torch_lr_scheduler optimizer \"linear_warmup_cosine\"
                      (dictionary \"initial_lr\" 2e-4 \"min_lr\" 1e-6 \"total_steps\" 100 \"warmup_steps\" 10)))
    (torch_backward loss)
    (torch_clip_grad_norm optimizer 1.0)   ; => the norm before clipping
    (torch_optimizer_step optimizer)
    (torch_scheduler_step scheduler)       ; => the new learning rate
"

(import torch
        lispetorch.schedule [make-scheduler SCHEDULER-TYPES]
        lispetorch.lisp.checks [primitive fail describe check-number check-bool check-tensor check-dict
                                check-module check-string])


(defn _optimizer [primitive value]
  (check-module primitive "optimizer" value torch.optim.Optimizer "an optimizer (from torch_optimizer_add_params)"))


(defn _scheduler [primitive value]
  (check-module primitive "scheduler" value torch.optim.lr-scheduler.LRScheduler
                "a scheduler (from torch_lr_scheduler)"))


(defn [primitive] torch-optimizer-add-params [params learning-rate weight-decay]
  "An AdamW optimizer over ``params`` (a list of tensors that require gradients) with the given learning rate
  and weight decay."
  (when (or (not (isinstance params #(list tuple))) (not params))
    (fail "torch_optimizer_add_params" f"params must be a non-empty list of tensors, got {(describe params)}"))
  (for [[i p] (enumerate params)]
    (when (not (isinstance p torch.Tensor))
      (fail "torch_optimizer_add_params" f"params element {i} must be a tensor, got {(describe p)}"))
    (when (not p.requires-grad)
      (fail "torch_optimizer_add_params"
            f"params element {i} ({(describe p)}) does not require gradients: nothing would train")))
  (torch.optim.AdamW params
                     :lr (check-number "torch_optimizer_add_params" "learning_rate" learning-rate :positive True)
                     :weight-decay (check-number "torch_optimizer_add_params" "weight_decay" weight-decay)))


(defn [primitive] torch-optimizer-zero-grad [optimizer]
  "Clears the gradients of the optimizer's parameters; returns true."
  (.zero-grad (_optimizer "torch_optimizer_zero_grad" optimizer) :set-to-none True)
  True)


(defn [primitive] torch-optimizer-step [optimizer]
  "One optimizer step with the current gradients; returns true."
  (.step (_optimizer "torch_optimizer_step" optimizer))
  True)


(defn [primitive] torch-clip-grad-norm [optimizer max-norm]
  "Scales the gradients of the optimizer's parameters so that their global L2 norm is at most ``max_norm``;
  returns the norm before clipping (a number)."
  (setv params (lfor group (. (_optimizer "torch_clip_grad_norm" optimizer) param-groups)
                     p (get group "params") :if (is-not p.grad None) p))
  (float (torch.nn.utils.clip-grad-norm- params
                                         (check-number "torch_clip_grad_norm" "max_norm" max-norm :positive True))))


(defn [primitive] torch-backward [loss [retain-graph False] [create-graph False]]
  "Computes the gradients of the one-element tensor ``loss``; returns true."
  (check-tensor "torch_backward" "loss" loss)
  (when (!= (.numel loss) 1)
    (fail "torch_backward" f"loss must have one element, got {(describe loss)}"))
  (when (not loss.requires-grad)
    (fail "torch_backward" (+ "loss does not depend on anything that trains (was it computed with "
                              "torch_set_grad_enabled false, or before torch_hf_lora_init?)")))
  (.backward loss :retain-graph (check-bool "torch_backward" "retain_graph" retain-graph)
             :create-graph (check-bool "torch_backward" "create_graph" create-graph))
  True)


(defn [primitive] torch-lr-scheduler [optimizer scheduler-type config]
  "A learning-rate schedule for ``optimizer``: ``linear_warmup_cosine``, ``cosine``, ``linear``,
  ``exponential``, ``step`` or ``constant``, configured by LispE's keys (``initial_lr``, ``min_lr``,
  ``total_steps``, ``warmup_steps``, ``gamma``, ``step_size``)."
  (_optimizer "torch_lr_scheduler" optimizer)
  (check-string "torch_lr_scheduler" "scheduler type" scheduler-type)
  (when (not-in scheduler-type SCHEDULER-TYPES)
    (fail "torch_lr_scheduler"
          f"unknown scheduler type {(repr scheduler-type)}; the types are {(.join ", " SCHEDULER-TYPES)}"))
  (make-scheduler optimizer scheduler-type (check-dict "torch_lr_scheduler" "config" config)))


(defn [primitive] torch-scheduler-step [scheduler]
  "Advances the schedule by one step; returns the new learning rate."
  (.step (_scheduler "torch_scheduler_step" scheduler))
  (torch-scheduler-get-lr scheduler))


(defn [primitive] torch-scheduler-get-lr [scheduler]
  "The learning rate in use now (that of the optimizer's first parameter group)."
  (float (get (. (_scheduler "torch_scheduler_get_lr" scheduler) optimizer param-groups) 0 "lr")))


(defn [primitive] torch-scheduler-set-lr [scheduler learning-rate]
  "Sets the learning rate of every parameter group now; the next ``torch_scheduler_step`` returns to the
  schedule. Returns the learning rate."
  (setv lr (check-number "torch_scheduler_set_lr" "learning_rate" learning-rate :positive True))
  (for [group (. (_scheduler "torch_scheduler_set_lr" scheduler) optimizer param-groups)]
    (setv (get group "lr") lr))
  lr)


(defn [primitive] torch-set-grad-enabled [enabled]
  "Turns gradient recording on (true) or off (false) for everything that follows; returns the new state."
  (torch.set-grad-enabled (check-bool "torch_set_grad_enabled" "enabled" enabled))
  (torch.is-grad-enabled))


(defn [primitive] torch-mps-synchronize [[safemode None]]
  "Waits for the work queued on the accelerator in use (CUDA or MPS) to finish. Returns true when it
  synchronised a device, false when there is none to wait for (CPU only). ``safemode`` is accepted for LispE
  compatibility and ignored."
  (cond (and (torch.cuda.is-available) (torch.cuda.is-initialized))
          (do (torch.cuda.synchronize) True)
        (and (hasattr torch.backends "mps") (torch.backends.mps.is-available))
          (do (torch.mps.synchronize) True)
        True False))


(export :objects [torch-optimizer-add-params torch-optimizer-zero-grad torch-optimizer-step torch-clip-grad-norm
                  torch-backward torch-lr-scheduler torch-scheduler-step torch-scheduler-get-lr
                  torch-scheduler-set-lr torch-set-grad-enabled torch-mps-synchronize])
