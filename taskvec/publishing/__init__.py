"""The publishing machinery: from an experiment file to the offline book.

``schema``: the experiment file as typed models. ``runner``: checks a profile, runs the section
notebooks with papermill, builds the book (``python -m taskvec book``). ``book``: the offline Jupyter
Book build and its static check. ``charts``: the Altair figures. ``paper``: the authors' published
results, for comparison. Imports run one way: publishing uses the studies and the method, never the
other way round.
"""
