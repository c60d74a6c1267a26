"""The planner: what a run will hold on the card and train in its budget, before the GPU is rented.

``memory`` (the analytic memory model, term by term), ``analytic`` (``onegpu finetune plan
--analytic``: verdicts, recommendations, the fix), ``measure`` (the live-tensor meter behind its
validation), ``plan`` (the verb: analytic, or real steps measured), ``day`` (``onegpu day plan``).
"""
