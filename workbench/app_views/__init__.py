"""Views of the Streamlit app (`app.py`): one module per view, each exposing `render(cfg)`.

`context` (arguments, the data-root guard, the run-directory layout) and `compute` (token grids,
PCA-as-RGB, embeddings, live model runs) import no streamlit, so they are usable and testable alone.
"""
