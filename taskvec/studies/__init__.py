"""The studies the book reports, built on the method (``taskvec.mechanism``, ``taskvec.experiment``).

``analysis``: geometry, dominance and interpretation of θ. ``long_answers``: answers of several tokens.
``context``: what θ needs (shots, prompts averaged). ``stats``: intervals and tests. ``sections``: one
cached call per result for the book's notebooks, and their parameter checks. Imports run one way:
studies use the method, never the publishing machinery (``taskvec.publishing``).
"""
