"""Every name the store spells: dimensions, variables, coordinates and their fixed values.

Nothing else in attnstore spells a dimension or variable name; import them from :mod:`attnstore.schema`.
"""

from __future__ import annotations

SCHEMA_VERSION = 2  # 2: portable uint16 + CF attrs (1: float32 through scale_offset/cast_value)
READABLE_SCHEMA_VERSIONS = (1, 2)  # versions this attnstore opens
FORMAT_NAME = "attnstore.attention"
ROOT_ATTR = "attnstore"

# ---- dimensions ------------------------------------------------------------------------------
INFERENCE = "inference"
DENOISE = "denoise"
LAYER = "layer"
HEAD = "head"
QUERY = "query"
KEY = "key"
CAMERA = "camera"
HEIGHT = "height"
WIDTH = "width"
CHANNEL = "channel"
ACTION_STEP = "action_step"
ACTION_DIM = "action_dim"
LANGUAGE_TOKEN = "language_token"
PREFIX_LAYER = "prefix_layer"
PREFIX_QUERY = "prefix_query"
PREFIX_KEY = "prefix_key"
STATE_DIM = "state_dim"
EPISODE_INDEX = "episode_index"
# dims of analysis results (readers/analysis.py); camera grids reuse PATCH_ROW / PATCH_COL as dims
REGION = "region"  # region_shares: each camera slot, "language", "action"
RANK = "rank"  # top_k_patches: 1 = most attended

# ---- variables -------------------------------------------------------------------------------
ATTENTION = "attention"
PREFIX_ATTENTION = "prefix_attention"
KEY_VALID = "key_valid"
IMAGES = "images"
ACTIONS = "actions"
LANGUAGE_TOKEN_ID = "language_token_id"
LANGUAGE_TOKEN_TEXT = "language_token_text"
STATE = "state"  # the robot state the policy saw (observation.state)

# coordinates on the inference axis
EPISODE = "episode"
ROLLOUT = "rollout"
ENV_STEP = "env_step"
INFERENCE_COORDS = (EPISODE, ROLLOUT, ENV_STEP)

# coordinates on the key axis (static for a store)
KEY_KIND = "key_kind"
KEY_REGION = "key_region"
PATCH_ROW = "patch_row"
PATCH_COL = "patch_col"
KEY_COORDS = (KEY_KIND, KEY_REGION, PATCH_ROW, PATCH_COL)

# coordinate on the denoise axis: flow-matching time of each denoise step (1.0 ... 0.1)
TIME = "time"

# per-episode table (dim EPISODE_INDEX; the coordinate of the same name is its commit marker)
TASK_GROUP = "task_group"
TASK_ID = "task_id"
TASK = "task"
SUCCESS = "success"
NUM_ENV_STEPS = "num_env_steps"
EPISODE_VARS = (TASK_GROUP, TASK_ID, TASK, SUCCESS, NUM_ENV_STEPS)

KIND_IMAGE = "image"
KIND_LANGUAGE = "language"
KIND_ACTION = "action"
REGION_LANGUAGE = "language"
REGION_ACTION = "action"

UNCOMMITTED = -1  # fill value of the commit markers (EPISODE and EPISODE_INDEX)
NOT_A_PATCH = -1  # patch_row / patch_col of keys that are not image patches
LANGUAGE_PAD_ID = -1  # language_token_id of padding positions

INDEX_CHUNK = 4096  # rows per chunk of the small per-inference index columns
EPISODE_CHUNK = 1024  # rows per chunk of the per-episode table
