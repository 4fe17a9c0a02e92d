"Training and tensor primitives against plain PyTorch."

(import math
        pytest
        torch
        torch.nn.functional :as F
        lispetorch :as lt
        lispetorch.lisp *
        lispetorch.lisp.checks [PrimitiveError])


(defn leaf [#* shape]
  (.requires-grad- (torch.randn #* shape)))


(defn test-optimizer-backward-clip-step []
  (setv a (leaf 4 3)
        b (leaf 5)
        optimizer (torch_optimizer_add_params [a b] 0.01 0.1))
  (assert (isinstance optimizer torch.optim.AdamW))
  (assert (= (get optimizer.param-groups 0 "lr") 0.01))
  (assert (= (get optimizer.param-groups 0 "weight_decay") 0.1))
  (setv loss (+ (.sum (** a 2)) (* 30 (.sum b))))
  (assert (torch_backward loss))
  (setv norm (float (torch.sqrt (+ (.sum (** a.grad 2)) (.sum (** b.grad 2)))))
        clipped (torch_clip_grad_norm optimizer 1.0))
  (assert (< (abs (- clipped norm)) 1e-4))  ; the norm before clipping
  (assert (> norm 1.0))
  (assert (< (abs (- (float (torch.sqrt (+ (.sum (** a.grad 2)) (.sum (** b.grad 2))))) 1.0)) 1e-4))
  (setv a0 (.clone (.detach a)))
  (assert (torch_optimizer_step optimizer))
  (assert (not (torch.equal a0 a)))
  (assert (torch_optimizer_zero_grad optimizer))
  (assert (and (is a.grad None) (is b.grad None)))
  ;; Errors name the primitive and the bad argument.
  (with [e (pytest.raises PrimitiveError :match "params element 0 .* does not require gradients")]
    (torch_optimizer_add_params [(torch.zeros 2)] 0.01 0.0))
  (with [e (pytest.raises PrimitiveError :match "params must be a non-empty list of tensors")]
    (torch_optimizer_add_params [] 0.01 0.0))
  (with [e (pytest.raises PrimitiveError :match "learning_rate must be a positive number")]
    (torch_optimizer_add_params [a] -1 0.0))
  (with [e (pytest.raises PrimitiveError :match "optimizer must be an optimizer")]
    (torch_optimizer_step "adam"))
  (with [e (pytest.raises PrimitiveError :match "loss must have one element")]
    (torch_backward (* 2 a)))
  (with [e (pytest.raises PrimitiveError :match "loss does not depend on anything that trains")]
    (torch_backward (torch.tensor 1.0))))


(defn [(pytest.mark.filterwarnings "ignore:Using backward.. with create_graph=True")] test-backward-retain-and-create-graph []
  (setv x (leaf 3)
        y (.sum (** x 3)))
  (torch_backward y True True)
  (setv g (.clone x.grad))
  (assert (torch.allclose g (* 3 (** (.detach x) 2))))
  (torch_backward y)  ; the graph was retained
  (assert (torch.allclose x.grad (* 2 g))))


(defn test-schedulers-follow-lispe-formulas []
  (for [kind lt.train.SCHEDULER-TYPES]
    (setv optimizer (torch_optimizer_add_params [(leaf 2)] 0.1 0.0)
          config (dictionary "initial_lr" 0.1 "min_lr" 0.001 "total_steps" 10 "warmup_steps" 3 "gamma" 0.5
                             "step_size" 4)
          scheduler (torch_lr_scheduler optimizer kind config))
    (assert (= (torch_scheduler_get_lr scheduler) (lt.train.lr-at kind 0 config)) kind)
    (for [t (range 1 13)]
      (torch_optimizer_step optimizer)
      (assert (< (abs (- (torch_scheduler_step scheduler) (lt.train.lr-at kind t config))) 1e-12) [kind t])))
  ;; set_lr holds until the next step, which goes back to the schedule.
  (setv optimizer (torch_optimizer_add_params [(leaf 2)] 0.1 0.0)
        config (dictionary "initial_lr" 0.1 "total_steps" 10)
        scheduler (torch_lr_scheduler optimizer "cosine" config))
  (assert (= (torch_scheduler_set_lr scheduler 0.5) 0.5))
  (assert (= (torch_scheduler_get_lr scheduler) 0.5))
  (assert (= (get optimizer.param-groups 0 "lr") 0.5))
  (torch_optimizer_step optimizer)
  (assert (< (abs (- (torch_scheduler_step scheduler) (lt.train.lr-at "cosine" 1 config))) 1e-12))
  (with [e (pytest.raises PrimitiveError :match "unknown scheduler type 'cosinus'; the types are linear_warmup_cosine")]
    (torch_lr_scheduler optimizer "cosinus" config))
  (with [e (pytest.raises PrimitiveError :match "unknown scheduler config key 'warmup'")]
    (torch_lr_scheduler optimizer "cosine" (dictionary "warmup" 3)))
  (with [e (pytest.raises PrimitiveError :match "scheduler must be a scheduler")]
    (torch_scheduler_step optimizer)))


(defn test-grad-mode-sync-and-live-tensors []
  (assert (torch.is-grad-enabled))
  (try
    (assert (= (torch_set_grad_enabled false) False))
    (assert (not (torch.is-grad-enabled)))
    (assert (not (. (* 2 (leaf 2)) requires-grad)))
    (finally (torch_set_grad_enabled true)))
  (assert (torch.is-grad-enabled))
  (with [e (pytest.raises PrimitiveError :match "enabled must be true, false or nil, got 1")]
    (torch_set_grad_enabled 1))
  (setv accelerator (or (torch.cuda.is-initialized)
                        (and (hasattr torch.backends "mps") (torch.backends.mps.is-available))))
  (assert (= (torch_mps_synchronize) (bool accelerator)))
  (setv before (tensor_in_memory)
        kept (lfor i (range 7) (torch.zeros 1)))
  (assert (>= (- (tensor_in_memory) before) 7))
  (del kept)
  (assert (< (tensor_in_memory) (+ before 7))))


(defn test-cross-entropy []
  (setv logits (torch.randn 6 11)
        targets (torch.tensor [1 0 10 3 -100 4]))
  (assert (torch.allclose (torch_cross_entropy logits targets) (F.cross-entropy logits targets :ignore-index -100)))
  (assert (= (. (torch_cross_entropy logits targets) ndim) 0))
  (with [e (pytest.raises PrimitiveError :match "targets must be integer class indices")]
    (torch_cross_entropy logits (torch.randn 6)))
  (with [e (pytest.raises PrimitiveError :match "predictions must be floating-point logits")]
    (torch_cross_entropy targets targets)))


(defn test-tensors []
  (setv ints (tensor_create (integers 1 2 3 4 5 6))
        fl (tensor_create (floats 4))
        nested (tensor_create [[1.5 2] [3 4]]))
  (assert (and (= ints.dtype torch.int64) (= (tensor_shape ints) [6])))
  (assert (and (= fl.dtype torch.float32) (= (.tolist fl) [4.0])))
  (assert (= (tensor_shape nested) [2 2]))
  (assert (= (.tolist nested) [[1.5 2.0] [3.0 4.0]]))
  (setv copy (tensor_create ints))
  (assert (and (torch.equal copy ints) (not (is copy ints))))
  (with [e (pytest.raises PrimitiveError :match "tensor_create: .*expected sequence of length 2")]
    (tensor_create [[1 2] [3]]))
  (with [e (pytest.raises PrimitiveError :match "expects a number or a list of numbers, got 'abc'")]
    (tensor_create "abc"))
  (setv m (tensor_reshape ints (integers 2 -1)))
  (assert (= (.tolist m) [[1 2 3] [4 5 6]]))
  (with [e (pytest.raises PrimitiveError :match "tensor_reshape: shape '\\[4, -1\\]' is invalid for input of size 6")]
    (tensor_reshape ints (integers 4 -1)))
  (with [e (pytest.raises PrimitiveError :match "shape must be a list of integers")]
    (tensor_reshape ints (floats 2.5 2)))
  (assert (= (.tolist (tensor_slice m 1 1 3)) [[2 3] [5 6]]))
  (assert (= (.tolist (tensor_slice m -1 -1 3)) [[3] [6]]))
  (assert (= (.tolist (tensor_slice m 0 1 2)) [[4 5 6]]))
  (with [e (pytest.raises PrimitiveError :match "dim 2 does not exist")]
    (tensor_slice m 2 0 1))
  (assert (= (.tolist (tensor_div m 2)) [[0.5 1.0 1.5] [2.0 2.5 3.0]]))
  (assert (= (.tolist (tensor_div (tensor_create (floats 3 6)) (tensor_create (floats 3)))) [1.0 2.0]))
  (with [e (pytest.raises PrimitiveError :match "divisor must be a tensor or a number")]
    (tensor_div m "2"))
  (assert (= (. (torch_to_device m "cpu") device type) "cpu"))
  (with [e (pytest.raises PrimitiveError :match "torch_to_device: unknown device 'tpu'")]
    (torch_to_device m "tpu")))
