"""Training N members at once with per-member hyperparameters: optimizers (``optim``), learning-rate schedules
(``lr_scheduler``), gradient clipping (``clip_grad``) and float16 loss scaling (``amp``) per member, per-member
values (``member_values``), per-member batches (``batches``) and the loop helpers (``loop``)."""
