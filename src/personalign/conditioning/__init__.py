"""What goes into the prompt or the input for a user: few-shot shots and the FSPO layout and
adapter (:mod:`~personalign.conditioning.fspo`), the Persona-Plug soft token
(:mod:`~personalign.conditioning.pplug`, trained by :mod:`~personalign.conditioning.pplug_train`).
Memory retrieval lives in :mod:`personalign.memory`; who the user is (their state from
comparisons) in :mod:`personalign.preference`."""
