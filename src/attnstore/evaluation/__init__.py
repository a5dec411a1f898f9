"""``attnstore eval``: a real lerobot evaluation (LIBERO) with attention capture into a store.

``config`` holds ``--attention.*`` (:class:`AttentionConfig`), ``libero_env`` the offline defaults
and pre-flight checks, ``tracking`` the episode bookkeeping read off lerobot's vector envs, and
``runner`` joins them around lerobot's own ``eval_main``.
"""

from attnstore.evaluation.config import AttentionConfig

__all__ = ["AttentionConfig"]
