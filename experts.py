"""Experts: callables from the structured (privileged) observation to a [num_envs, action_dim] action.

Every expert satisfies one interface, ``expert(obs: dict) -> torch.Tensor``, where ``obs`` is the
``state_dict`` observation the backend returned (``{"agent": {...}, "extra": {...}}``, batched tensors).
``ExpertResidualWrapper`` calls it once per step (and on the final observation of episodes that end); any
plain function with that signature works too.

- ``ZeroExpert``: no prior; the residual is the whole action.
- ``IKExpert``: a scripted controller per task (position and orientation), in the env's control mode.
- ``ModelExpert``: a policy from a checkpoint of these scripts, acting deterministically.
- ``StatePolicyExpert``: a policy trained elsewhere, on ManiSkill's flat "state" observation: the Agent of
  ManiSkill's PPO baselines (its state dict), a TorchScript module or an exported program.
- custom: ``load_expert_fn("path/to/file.py:function")`` or ``"package.module:function"``.

``--expert-type`` may name several experts (``ik,zero``): ``make_experts`` builds them all, and the
wrapper shows the policy every expert action and fuses them (``util.compose_action``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import zipfile
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn as nn
from mani_skill.utils.geometry.rotation_conversions import (axis_angle_to_matrix, matrix_to_axis_angle,
                                                             matrix_to_quaternion, quaternion_to_matrix)

from util import (UsageError, check_checkpoint, check_fusion, compose_action, experts_policy_obs, first_line,
                  flat_state, image_policy_obs, load_checkpoint, observe_experts)

ExpertFn = Callable[[dict], torch.Tensor]
EXPERT_TYPES = ("zero", "ik", "model", "custom")


def _unknown_expert(expert_type: str) -> UsageError:
    return UsageError(f"unknown expert type '{expert_type}'; valid: {', '.join(EXPERT_TYPES)}, "
                      f"or a comma list of them such as ik,zero")


def _batch_size(obs: dict) -> tuple[int, torch.device]:
    leaf = obs
    while isinstance(leaf, dict):
        leaf = next(iter(leaf.values()))
    return leaf.shape[0], leaf.device


class ZeroExpert:
    """No prior knowledge: the residual is the whole action (plain PPO with a wider observation)."""

    def __init__(self, action_dim: int):
        self.action_dim = action_dim

    def __call__(self, obs: dict) -> torch.Tensor:
        num_envs, device = _batch_size(obs)
        return torch.zeros(num_envs, self.action_dim, device=device)


# ----------------------------------------------------------------------------------------------
# IK expert: task plans give a TCP motion (a displacement and a rotation, in the world frame) and a
# gripper command; the output stage maps them to the control mode.
# ----------------------------------------------------------------------------------------------
CUBE_HALF = 0.02  # half the edge of the cubes in the supported tasks (m)
HOVER = 0.05  # clearance above an object before descending onto it (m)
ALIGN_TOL = 0.01  # xy distance under which the gripper counts as above its target (m)
TURN_TOL = 0.1  # rotation (rad) under which the gripper counts as turned to its target
OPEN, CLOSED = 1.0, -1.0
# How far a plan's phase can be trusted (its confidence, for adaptive residual scaling): moving through free
# space to a known pose is reliable; closing on an object and other contact (a grasp, a push, setting an
# object down) is where a script meets the unmodelled; fine alignment and insertion, millimetres from a
# collision, is where it fails first
TRUST_FREE, TRUST_CONTACT, TRUST_FINE = 1.0, 0.5, 0.0


class Motion(NamedTuple):
    """A plan's command for one step, batched."""
    displacement: torch.Tensor  # [N, 3]: where the TCP should go, world frame (m)
    rotation: torch.Tensor  # [N, 3]: how it should turn, a world-frame rotation vector (rad)
    gripper: torch.Tensor  # [N]: OPEN or CLOSED
    confidence: torch.Tensor  # [N] in [0, 1]: the trust of the phase each env is in (TRUST_*)


def _either(mask: torch.Tensor, a: Motion, b: Motion) -> Motion:
    """``a`` where ``mask``, else ``b``."""
    return Motion(*(torch.where(mask[:, None] if x.dim() == 2 else mask, x, y) for x, y in zip(a, b)))


def _trust(mask: torch.Tensor, where_true: float, elsewhere: float) -> torch.Tensor:
    return torch.where(mask, where_true, elsewhere).float()


def _pose(raw_pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ManiSkill's raw pose [N, 7] (position, quaternion wxyz) -> (position [N, 3], rotation matrix [N, 3, 3])."""
    return raw_pose[:, :3], quaternion_to_matrix(raw_pose[:, 3:7])


def _rotation_between(current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The world-frame rotation vector (axis * angle) that turns rotation ``current`` into ``target``."""
    return matrix_to_axis_angle(target @ current.transpose(1, 2))


def _frame(y_axis: torch.Tensor, z_axis: torch.Tensor) -> torch.Tensor:
    """The rotation whose y and z axes are the given orthogonal unit vectors."""
    return torch.stack([torch.linalg.cross(y_axis, z_axis), y_axis, z_axis], dim=2)


def _no_turn(tcp: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(tcp)


def _lift_then_move(tcp: torch.Tensor, dest: torch.Tensor, safe_z: torch.Tensor) -> torch.Tensor:
    """Waypoint towards ``dest`` that never sweeps low across the table: rise to ``safe_z``, travel
    above ``dest``, then descend. Small xy errors are fixed at the current height, so the descent does
    not bounce between rising and sinking."""
    xy_err = torch.linalg.norm(dest[:, :2] - tcp[:, :2], dim=1)
    low = (tcp[:, 2] < safe_z - ALIGN_TOL)[:, None]
    rise = torch.cat([tcp[:, :2], safe_z[:, None]], dim=1)
    travel = torch.cat([dest[:, :2], safe_z[:, None]], dim=1)
    shift = torch.cat([dest[:, :2], tcp[:, 2:]], dim=1)
    off_course = torch.where((xy_err < 3 * ALIGN_TOL)[:, None], shift, rise)
    waypoint = torch.where(low, off_course, travel)
    return torch.where((xy_err <= ALIGN_TOL)[:, None], dest, waypoint)


def _finger_width(obs: dict) -> torch.Tensor:
    return obs["agent"]["qpos"][:, 7:9].sum(dim=1)


def _pick_and_place(obs: dict, tcp, obj, place, grasped):
    """Hover over the object, descend, close; once grasped, move the object to ``place``."""
    at_obj = (torch.linalg.norm(obj - tcp, dim=1) < ALIGN_TOL)
    missed = ~grasped & (_finger_width(obs) < 0.01)  # closed on nothing: open and try again
    approach = _lift_then_move(tcp, obj, obj[:, 2] + HOVER)
    carry = tcp + (place - obj)  # move the object, not the TCP, onto the goal
    dest = torch.where(grasped[:, None], carry, approach)
    gripper = torch.where(grasped | (at_obj & ~missed), CLOSED, OPEN)
    dest = torch.where(missed[:, None], torch.cat([tcp[:, :2], tcp[:, 2:] + HOVER], dim=1), dest)
    return Motion(dest - tcp, _no_turn(tcp), gripper, _trust(at_obj & ~grasped, TRUST_CONTACT, TRUST_FREE))


def _plan_pick_cube(obs: dict):
    extra = obs["extra"]
    tcp, obj = extra["tcp_pose"][:, :3], extra["obj_pose"][:, :3]
    return _pick_and_place(obs, tcp, obj, extra["goal_pos"], extra["is_grasped"].bool())


def _plan_stack_cube(obs: dict):
    extra = obs["extra"]
    tcp, cube_a, cube_b = extra["tcp_pose"][:, :3], extra["cubeA_pose"][:, :3], extra["cubeB_pose"][:, :3]
    width = _finger_width(obs)
    # StackCube exposes no grasp flag: the cube sits between fingers closed to between its edge (4 cm)
    # and its diagonal (5.7 cm, when its yaw is off the gripper's)
    grasped = (torch.linalg.norm(cube_a - tcp, dim=1) < 0.015) & (width > 0.03) & (width < 0.058)
    on_top = cube_b + torch.tensor([0.0, 0.0, 2 * CUBE_HALF], device=tcp.device)
    above = on_top + torch.tensor([0.0, 0.0, HOVER], device=tcp.device)
    aligned = torch.linalg.norm(cube_a[:, :2] - cube_b[:, :2], dim=1) < 0.005
    place = torch.where(aligned[:, None], on_top, above)  # carry high, then lower straight down
    carry = _pick_and_place(obs, tcp, cube_a, place, grasped)
    placed = aligned & ((cube_a[:, 2] - on_top[:, 2]).abs() < 0.005)
    # on top: let go and hold still; setting the cube down is contact
    release = Motion(torch.zeros_like(tcp), carry.rotation, torch.full_like(carry.gripper, OPEN),
                     torch.full_like(carry.confidence, TRUST_CONTACT))
    carry = carry._replace(confidence=torch.where(grasped & aligned, TRUST_CONTACT, carry.confidence))
    return _either(placed, release, carry)


def _push_towards_goal(obs: dict, toward: float):
    """Push (toward=+1) or pull (toward=-1) the cube along x onto the goal, with a closed gripper."""
    extra = obs["extra"]
    tcp, obj, goal = extra["tcp_pose"][:, :3], extra["obj_pose"][:, :3], extra["goal_pos"]
    offset = torch.tensor([toward * (CUBE_HALF + 0.015), 0.0, 0.0], device=tcp.device)
    contact = obj - offset  # the side of the cube facing away from the goal
    in_line = ((tcp[:, 1] - obj[:, 1]).abs() < ALIGN_TOL) & (tcp[:, 2] < obj[:, 2] + ALIGN_TOL)
    behind = toward * (obj[:, 0] - tcp[:, 0]) > CUBE_HALF
    pushing = in_line & behind
    push = tcp + torch.cat([goal[:, :2] - obj[:, :2], (obj[:, 2:] - tcp[:, 2:])], dim=1)
    approach = _lift_then_move(tcp, contact, obj[:, 2] + 2 * CUBE_HALF + HOVER)
    dest = torch.where(pushing[:, None], push, approach)
    gripper = torch.full_like(tcp[:, 0], CLOSED)
    return Motion(dest - tcp, _no_turn(tcp), gripper, _trust(pushing, TRUST_CONTACT, TRUST_FREE))


def _top_down_grasp(obs: dict, tcp_p, tcp_r, point, closing, grasped, across):
    """Turn the gripper to point down with its fingers closing along ``closing`` (horizontal), hover over
    ``point``, descend onto it and close on an object ``across`` wide."""
    down = torch.zeros_like(tcp_p)
    down[:, 2] = -1.0
    # the gripper is symmetric under half a turn about its axis: take the closing direction nearer its own
    closing = torch.where(((closing * tcp_r[:, :, 1]).sum(1) < 0)[:, None], -closing, closing)
    target_r = _frame(closing, down)
    turn = _rotation_between(tcp_r, target_r)
    turned = torch.linalg.norm(turn, dim=1) < TURN_TOL
    approach = _lift_then_move(tcp_p, point, point[:, 2] + HOVER)
    # descend only once turned: the fingers would strike the object on the way down
    dest = torch.where((turned | (tcp_p[:, 2] > point[:, 2] + HOVER - ALIGN_TOL))[:, None], approach,
                       torch.cat([tcp_p[:, :2], point[:, 2:] + HOVER], dim=1))
    at_point = (torch.linalg.norm(point - tcp_p, dim=1) < ALIGN_TOL) & turned
    width = _finger_width(obs)
    missed = ~grasped & (width < across - 0.005)  # closed on nothing: open and rise
    dest = torch.where(missed[:, None], torch.cat([tcp_p[:, :2], tcp_p[:, 2:] + HOVER], dim=1), dest)
    closing_now = at_point & ~missed
    gripper = torch.where(closing_now, CLOSED, OPEN)
    return Motion(dest - tcp_p, turn, gripper, _trust(at_point, TRUST_CONTACT, TRUST_FREE))


def _holding(obs: dict, tcp_p, obj_p, axis, half_length, across) -> torch.Tensor:
    """Whether the fingers are closed on a bar: the TCP on its axis, within its length, fingers about
    ``across`` apart."""
    offset = tcp_p - obj_p
    along = (offset * axis).sum(1)
    off_axis = torch.linalg.norm(offset - along[:, None] * axis, dim=1)
    width = _finger_width(obs)
    return (off_axis < 0.02) & (along.abs() < half_length) & (width > across - 0.01) & (width < across + 0.005)


def _move_held(tcp_p, tcp_r, obj_p, obj_r, target_p, target_r):
    """The TCP motion that brings a held object to (target_p, target_r), given how it sits in the gripper now."""
    grip_r = obj_r.transpose(1, 2) @ tcp_r  # the TCP in the object's frame, measured at every step
    grip_p = (obj_r.transpose(1, 2) @ (tcp_p - obj_p)[:, :, None])[:, :, 0]
    want_r = target_r @ grip_r
    want_p = target_p + (target_r @ grip_p[:, :, None])[:, :, 0]
    return want_p - tcp_p, _rotation_between(tcp_r, want_r)


INSERT_ENTRY = 0.01  # a held object's lead waits this far before the mouth until it is aligned (m)
INSERT_OVERSHOOT = 3.0  # sideways correction near the insertion axis, in units of the error


def _insert_held(tcp_p, tcp_r, obj_p, obj_r, frame_p, frame_r, lead, trail, mouth, full, align_tol, push_step):
    """Insert a held object along the x axis of the frame (frame_p, frame_r), whose axes the object's end
    with: its lead point (``lead`` along its own x from its origin) waits INSERT_ENTRY before ``mouth`` (the
    frame's x where the opening begins) until the lead and trail points are within ``align_tol`` of the
    axis, then goes in ``push_step`` at a time, so the object stays square to the opening, until the lead
    reaches ``full``. Returns the TCP motion and whether the step is fine work (lining up near the mouth,
    or pushing in)."""
    # lengths are numbers or [N] tensors; numbers stay on the host, so no step copies them to the device
    along = lambda length, axis: (length[:, None] if torch.is_tensor(length) else length) * axis
    obj_x, frame_x = obj_r[:, :, 0], frame_r[:, :, 0]
    in_frame = lambda point: (frame_r.transpose(1, 2) @ (point - frame_p)[:, :, None])[:, :, 0]
    lead_f, trail_f = in_frame(obj_p + along(lead, obj_x)), in_frame(obj_p + along(trail, obj_x))
    off_axis = torch.maximum(torch.linalg.norm(lead_f[:, 1:], dim=1), torch.linalg.norm(trail_f[:, 1:], dim=1))
    entering = lead_f[:, 0] > mouth - INSERT_ENTRY / 2  # already at or past the mouth
    push = (off_axis < align_tol) | entering
    lead_target = torch.where(push, torch.clamp(lead_f[:, 0] + push_step, max=full), mouth - INSERT_ENTRY)
    target_p = frame_p + along(lead_target - lead, frame_x)
    move, turn = _move_held(tcp_p, tcp_r, obj_p, obj_r, target_p, frame_r)
    # the arm's controller settles a few millimetres short of a small command (it tracks the commanded pose
    # with a spring): near the axis, ask for more than the sideways error, so the settled pose meets it
    axial = (move * frame_x).sum(1, keepdim=True) * frame_x
    sideways = move - axial
    near = (torch.linalg.norm(sideways, dim=1, keepdim=True) < 0.005)
    move = axial + torch.where(near, INSERT_OVERSHOOT * sideways, sideways)
    fine = push | (torch.linalg.norm(lead_f[:, 1:], dim=1) < 0.02) & (lead_f[:, 0] > mouth - 3 * INSERT_ENTRY)
    return move, turn, fine


PEG_PUSH_STEP = 0.02  # insertion depth per step (m)
PEG_ALIGN_TOL = 0.003  # head and tail within this of the hole's axis before the peg goes in (m)


def _plan_peg_insertion(obs: dict):
    """PegInsertionSide: grasp the peg near its tail from above, carry it to face the hole with the head a
    centimetre before the mouth, align head and tail with the hole's axis, then push it in along the axis.
    The hole leaves 3 mm of clearance, so the alignment is the step a script gets wrong."""
    extra = obs["extra"]
    tcp_p, tcp_r = _pose(extra["tcp_pose"])
    peg_p, peg_r = _pose(extra["peg_pose"])
    hole_p, hole_r = _pose(extra["box_hole_pose"])
    length, radius = extra["peg_half_size"][:, 0], extra["peg_half_size"][:, 1]
    peg_x = peg_r[:, :, 0]
    grasped = _holding(obs, tcp_p, peg_p, peg_x, length, 2 * radius)
    # grasp towards the tail, leaving the head's half free to enter the hole
    tail_offset = torch.clamp(length / 2 + 0.01, min=0.05)
    grasp_point = peg_p - tail_offset[:, None] * peg_x
    grasp = _top_down_grasp(obs, tcp_p, tcp_r, grasp_point, peg_r[:, :, 1], grasped, 2 * radius)
    # the hole's pose lies a half length inside the box: the mouth is a half length before it
    move, turn, fine = _insert_held(tcp_p, tcp_r, peg_p, peg_r, hole_p, hole_r, lead=length, trail=-length,
                                    mouth=-length, full=0.0, align_tol=PEG_ALIGN_TOL, push_step=PEG_PUSH_STEP)
    held = Motion(move, turn, torch.full_like(length, CLOSED), _trust(fine, TRUST_FINE, TRUST_FREE))
    return _either(grasped, held, grasp)


LIFT_PEG_GRIP = 0.1  # LiftPegUpright: grasp this far from the peg's centre, near one end (m)


def _plan_lift_peg_upright(obs: dict):
    """LiftPegUpright: grasp the lying peg from above near its end farther from the robot, lift it while
    turning the gripper a quarter turn about the fingers' closing axis (so the gripper ends pointing away
    from the robot and the peg hangs straight down from it), then lower it onto its end."""
    extra = obs["extra"]
    tcp_p, tcp_r = _pose(extra["tcp_pose"])
    peg_p, peg_r = _pose(extra["obj_pose"])
    half_length, half_width = 0.12, 0.025  # LiftPegUpright-v1's fixed peg
    peg_x = peg_r[:, :, 0]
    up = torch.zeros_like(tcp_p)
    up[:, 2] = 1.0
    grasped = _holding(obs, tcp_p, peg_p, peg_x, half_length, 2 * half_width)
    # grip the end with the larger x (the robot stands at -x); the other end will hang down
    grip_side = torch.where(peg_x[:, :1] >= 0, 1.0, -1.0)
    # the peg lies flat at the start: the horizontal normal to its axis is the closing direction
    closing = torch.nn.functional.normalize(torch.linalg.cross(up, peg_x), dim=1)
    grasp = _top_down_grasp(obs, tcp_p, tcp_r, peg_p + LIFT_PEG_GRIP * grip_side * peg_x, closing, grasped,
                            2 * half_width)
    # held: turn the hanging end (-grip_side * peg_x) to point straight down
    hanging = -grip_side * peg_x
    axis = torch.nn.functional.normalize(torch.linalg.cross(hanging, -up), dim=1)
    angle = torch.acos(torch.clamp((hanging * -up).sum(1), -1.0, 1.0))
    upright_r = axis_angle_to_matrix(axis * angle[:, None]) @ peg_r
    # turn high above the table, then lower the peg until its end meets the table, below the gripper, so
    # that turning does not carry it sideways; pressing it into the table tilts the held peg out of upright
    upright = angle < 0.1
    target_z = torch.where(upright, torch.full_like(angle, half_length), torch.full_like(angle, 0.2))
    target_p = torch.cat([tcp_p[:, :2], target_z[:, None]], dim=1)
    move, turn = _move_held(tcp_p, tcp_r, peg_p, peg_r, target_p, upright_r)
    # turning in the air is free motion; setting the peg on its end is contact
    held = Motion(move, turn, torch.full_like(angle, CLOSED), _trust(upright, TRUST_CONTACT, TRUST_FREE))
    return _either(grasped, held, grasp)


POKE_GAP = 0.015  # PokeCube: the peg's head waits this far behind the cube before pushing (m)
POKE_LIFT = 0.005  # PokeCube: the peg is carried this far above the table, clear of friction (m)
POKE_STEP = 0.04  # PokeCube: how far the head pushes per step, slow enough to stop the cube on the goal (m)


def _plan_poke_cube(obs: dict):
    """PokeCube: grasp the lying peg from above behind its middle, carry it so that its head faces the cube
    from behind (the goal lies along +x from the cube), with the peg along x, then push the cube with the
    head a little at a time until it sits on the goal, and hold still (success needs a static robot)."""
    extra = obs["extra"]
    tcp_p, tcp_r = _pose(extra["tcp_pose"])
    peg_p, peg_r = _pose(extra["peg_pose"])
    cube_p = extra["cube_pose"][:, :3]
    goal = cube_p + extra["cube_to_goal_pos"]
    half_length, half_width = 0.12, 0.025  # PokeCube-v1's fixed peg
    peg_x = peg_r[:, :, 0]
    grasped = _holding(obs, tcp_p, peg_p, peg_x, half_length, 2 * half_width)
    grasp = _top_down_grasp(obs, tcp_p, tcp_r, peg_p - 0.04 * peg_x, peg_r[:, :, 1], grasped, 2 * half_width)

    # the goal is placed along +x from the cube, so the push runs along x and the peg lies along it; a
    # direction taken from the cube to the goal would flip the moment the cube passed the goal
    push_r = torch.eye(3, device=tcp_p.device).expand_as(tcp_r)
    head = peg_p + half_length * peg_x
    behind = head[:, 0] - cube_p[:, 0]  # negative: the head is behind the cube
    sideways = (head[:, 1] - cube_p[:, 1]).abs()
    pushing = (sideways < ALIGN_TOL) & (behind < 0) & (behind > -CUBE_HALF - 2 * POKE_GAP)
    remaining = goal[:, 0] - cube_p[:, 0]
    # line up behind the cube, then advance along its line a step at a time, stopping at the goal
    wait = torch.full_like(behind, -(CUBE_HALF + POKE_GAP))
    advance = torch.where(pushing, behind + remaining.clamp(0.0, POKE_STEP), wait)
    head_target = torch.stack([cube_p[:, 0] + advance, cube_p[:, 1],
                               torch.full_like(behind, half_width + POKE_LIFT)], dim=1)
    target_p = head_target - half_length * push_r[:, :, 0]
    move, turn = _move_held(tcp_p, tcp_r, peg_p, peg_r, target_p, push_r)
    # hold still once the cube is on the goal: success needs the robot at rest
    placed = torch.linalg.norm(goal[:, :2] - cube_p[:, :2], dim=1) < 0.01
    move = torch.where(placed[:, None], torch.zeros_like(move), move)
    turn = torch.where(placed[:, None], torch.zeros_like(turn), turn)
    held = Motion(move, turn, torch.full_like(behind, CLOSED), _trust(pushing, TRUST_CONTACT, TRUST_FREE))
    return _either(grasped, held, grasp)


CHARGER_BASE = 0.02  # PlugCharger: half the length of the charger's base, behind its origin (m)
CHARGER_PRONG = 0.016  # PlugCharger: the prongs' length, ahead of the charger's origin (m)
CHARGER_ALIGN_TOL = 0.0003  # PlugCharger: prongs within this of their holes' axes before going in (m)
CHARGER_PUSH_STEP = 0.004  # PlugCharger: insertion depth per step (m)


def _plan_plug_charger(obs: dict):
    """PlugCharger: grasp the charger's base from above, carry it to face the receptacle with the prongs a
    centimetre before its mouth, align the charger with the goal pose, then push it in along the goal's
    axis. The prongs' holes leave half a millimetre of clearance."""
    extra = obs["extra"]
    tcp_p, tcp_r = _pose(extra["tcp_pose"])
    charger_p, charger_r = _pose(extra["charger_pose"])
    goal_p, goal_r = _pose(extra["goal_pose"])
    charger_x = charger_r[:, :, 0]
    base = charger_p - CHARGER_BASE * charger_x
    across = 0.03  # the base's width
    grasped = _holding(obs, tcp_p, base, charger_x, CHARGER_BASE, across)
    grasp = _top_down_grasp(obs, tcp_p, tcp_r, base, charger_r[:, :, 1], grasped, across)
    # the goal is the charger's pose plugged in: the prongs' tips end a prong's length past the mouth
    move, turn, fine = _insert_held(tcp_p, tcp_r, charger_p, charger_r, goal_p, goal_r, lead=CHARGER_PRONG,
                                    trail=0.0, mouth=0.0, full=CHARGER_PRONG, align_tol=CHARGER_ALIGN_TOL,
                                    push_step=CHARGER_PUSH_STEP)
    held = Motion(move, turn, torch.full_like(tcp_p[:, 0], CLOSED), _trust(fine, TRUST_FINE, TRUST_FREE))
    return _either(grasped, held, grasp)


TASK_PLANS = {
    "PickCube-v1": _plan_pick_cube,
    "StackCube-v1": _plan_stack_cube,
    "PushCube-v1": lambda obs: _push_towards_goal(obs, +1.0),
    "PullCube-v1": lambda obs: _push_towards_goal(obs, -1.0),
    "PegInsertionSide-v1": _plan_peg_insertion,
    "LiftPegUpright-v1": _plan_lift_peg_upright,
    "PokeCube-v1": _plan_poke_cube,
    "PlugCharger-v1": _plan_plug_charger,
}
# what each plan aims at, which a calibration error displaces (the peg's own pose, where the goal is implicit)
TASK_TARGETS = {"PickCube-v1": "goal_pos", "StackCube-v1": "cubeB_pose", "PushCube-v1": "goal_pos",
                "PullCube-v1": "goal_pos", "PegInsertionSide-v1": "box_hole_pose", "LiftPegUpright-v1": "obj_pose",
                "PokeCube-v1": "cube_pose", "PlugCharger-v1": "goal_pose"}
# plans that turn the gripper need a control mode that can
TURNING_PLANS = ("PegInsertionSide-v1", "LiftPegUpright-v1", "PokeCube-v1", "PlugCharger-v1")
IK_CONTROL_MODES = ("pd_ee_delta_pos", "pd_ee_delta_pose", "pd_joint_delta_pos")
EE_STEP = 0.1  # metres per step at action 1 in the Panda's pd_ee_delta_* controllers
EE_TURN = 0.1  # radians per step at rotation action 1 in its pd_ee_delta_pose controller
JOINT_STEP = 0.1  # radians per step at action 1 in its pd_joint_delta_pos controller


def ik_control_modes(env_id: str) -> tuple[str, ...]:
    """The control modes the IK expert acts in for ``env_id``, its default first."""
    if env_id == "LiftPegUpright-v1":
        # the quarter turn runs the Panda's wrist into its joint limit through DifferentialIK, which knows no
        # limits; ManiSkill's pose controller finds another arm configuration
        return ("pd_ee_delta_pose",)
    if env_id == "PlugCharger-v1":
        # ManiSkill's pose controller holds the arm where its IK solve fails, which large combined steps with
        # the charger in hand can make it do for the rest of an episode (bench/RESULTS.md, Experts); the
        # damped IK keeps going
        return ("pd_joint_delta_pos", "pd_ee_delta_pose")
    if env_id in TURNING_PLANS:
        return ("pd_ee_delta_pose", "pd_joint_delta_pos")
    return IK_CONTROL_MODES


class DifferentialIK:
    """Batched damped-least-squares IK for the Panda: a TCP motion (displacement, rotation vector) -> arm
    joint displacements, through the 6-row Jacobian (so the orientation follows the command too).

    The Jacobian comes from pytorch_kinematics (a ManiSkill dependency) on the Panda URDF that ManiSkill
    ships. The tasks place the robot base without rotation, so base-frame and world-frame motions agree.
    """

    def __init__(self, device: torch.device, damping: float = 0.05):
        import pytorch_kinematics as pk
        from mani_skill.agents.robots.panda import Panda

        with open(Panda.urdf_path, "rb") as f:
            self.chain = pk.build_serial_chain_from_urdf(f.read(), end_link_name=Panda.ee_link_name)
        self.chain = self.chain.to(device=device)
        self.damping = damping

    def __call__(self, qpos: torch.Tensor, displacement: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        jac = self.chain.jacobian(qpos[:, :7])  # [N, 6, 7]: linear rows, then angular
        twist = torch.cat([displacement, rotation], dim=1)
        jjt = jac @ jac.transpose(1, 2) + self.damping ** 2 * torch.eye(6, device=qpos.device)
        # solve_ex: solve's error check would make every call wait for the GPU; damping keeps jjt invertible
        step = torch.linalg.solve_ex(jjt, twist[:, :, None])[0]
        return (jac.transpose(1, 2) @ step)[:, :, 0]


class CalibrationError:
    """A fixed error in where the expert perceives its task's target (TASK_TARGETS: the goal, the cube to stack on
    or to poke, the hole, the peg to lift, the charger's goal), as a miscalibrated pose estimate of it would give:
    its position shifted by ``millimetres`` and its orientation turned by ``degrees`` about its own origin. The
    directions of the shift and of the rotation's axis are drawn once from ``seed``. Errors shared by every object
    would not do: the plans move objects relative to each other, and such errors cancel in a closed loop."""

    def __init__(self, millimetres: float, degrees: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        shift_dir, axis = (torch.nn.functional.normalize(torch.randn(3, generator=g), dim=0) for _ in range(2))
        self.shift = shift_dir * millimetres / 1000
        self.rotation = axis_angle_to_matrix(axis * degrees * torch.pi / 180)

    def __call__(self, target: torch.Tensor) -> torch.Tensor:
        """A target's position [N, 3] or pose [N, 7] -> where the expert perceives it."""
        if self.shift.device != target.device:
            self.shift, self.rotation = self.shift.to(target.device), self.rotation.to(target.device)
        p = target[:, :3] + self.shift
        if target.shape[1] == 3:
            return p
        q = matrix_to_quaternion(self.rotation @ quaternion_to_matrix(target[:, 3:7]))
        return torch.cat([p, q], dim=1)


def calibration(args) -> Optional[CalibrationError]:
    """The IK expert's calibration error of a run's flags (its Args, or a checkpoint's dict of them)."""
    get = args.get if isinstance(args, dict) else lambda name, default: getattr(args, name, default)
    millimetres, degrees = get("ik_calibration_mm", 0.0), get("ik_calibration_deg", 0.0)
    if millimetres == 0 and degrees == 0:
        return None
    return CalibrationError(millimetres, degrees, get("ik_calibration_seed", 0))


class IKExpert:
    """A scripted, stateless controller for the tasks of TASK_PLANS.

    Each step it derives the task phase from the privileged state (approach, grasp, carry, align, insert,
    release) and commands the TCP motion ``gain * error``, where ``error`` is the displacement and rotation
    to the phase's target pose. Gain 1.0 asks for the whole error in one control step (the controllers cap
    a step at 10 cm and 0.1 rad); lower gains approach more slowly. ``calibration`` (a CalibrationError)
    makes it perceive its target where it is not. Every branch is batched torch, on the obs' device.
    """

    def __init__(self, env_id: str, control_mode: str, gain: float = 1.0,
                 calibration: Optional[CalibrationError] = None):
        if env_id not in TASK_PLANS:
            raise ValueError(f"the IK expert has no plan for {env_id}; supported: {', '.join(TASK_PLANS)}")
        if control_mode not in ik_control_modes(env_id):
            raise ValueError(f"the IK expert cannot act on {env_id} in control mode {control_mode}; "
                             f"supported: {', '.join(ik_control_modes(env_id))}")
        if not gain > 0:
            raise ValueError(f"the IK gain must be > 0, got {gain}")
        self.plan, self.control_mode, self.gain, self.calibration = TASK_PLANS[env_id], control_mode, gain, calibration
        self.env_id = env_id
        self.ik: Optional[DifferentialIK] = None
        self._last: tuple = (None, None)  # (the observation of the last call, its plan's confidence)

    def _motion(self, obs: dict) -> Motion:
        if self.calibration is not None:
            target = TASK_TARGETS[self.env_id]
            obs = dict(obs, extra=dict(obs["extra"], **{target: self.calibration(obs["extra"][target])}))
        motion = self.plan(obs)
        self._last = (obs, motion.confidence)
        return motion

    def confidence(self, obs: dict) -> torch.Tensor:
        """[N] in [0, 1]: how far the plan's current phase can be trusted (TRUST_FREE, TRUST_CONTACT, TRUST_FINE)."""
        last_obs, confidence = self._last
        return confidence if last_obs is obs else self._motion(obs).confidence

    def __call__(self, obs: dict) -> torch.Tensor:
        displacement, rotation, gripper, _ = self._motion(obs)
        self._last = (obs, self._last[1])  # keyed by the caller's observation, not the perceived one
        displacement, rotation = self.gain * displacement, self.gain * rotation
        if self.control_mode == "pd_joint_delta_pos":
            if self.ik is None:
                self.ik = DifferentialIK(displacement.device)
            dq = self.ik(obs["agent"]["qpos"], displacement, rotation) / JOINT_STEP
            # scale the whole vector (not per joint) so the direction survives the action bounds
            arm = dq / dq.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
        else:
            move = displacement / EE_STEP
            arm = move / torch.linalg.norm(move, dim=1, keepdim=True).clamp(min=1.0)
            if self.control_mode == "pd_ee_delta_pose":
                # the Panda's controller scales rotation actions by its lower bound, -0.1 rad, and
                # composes them as XYZ Euler angles, which for steps of 0.1 rad are the rotation vector
                turn = -rotation / EE_TURN
                arm = torch.cat([arm, turn / torch.linalg.norm(turn, dim=1, keepdim=True).clamp(min=1.0)], dim=1)
        return torch.cat([arm, gripper[:, None]], dim=1)


# ----------------------------------------------------------------------------------------------
# Model expert
# ----------------------------------------------------------------------------------------------
def _obs_signature(policy_obs) -> dict:
    """The checkpoint metadata a policy observation must match."""
    if isinstance(policy_obs, dict):
        return dict(rgb_shape=list(policy_obs["rgb"].shape[1:]), state_dim=policy_obs["state"].shape[1])
    return dict(obs_dim=policy_obs.shape[1])


def mlp_actor(state_dict: dict) -> nn.Sequential:
    """The policy mean of a state checkpoint, rebuilt from its tensors' shapes: the ``actor_mean.<i>.weight`` and
    ``.bias`` entries are Linear layers with a Tanh between each two, as in ppo.py's and ppo_fast.py's Agent."""
    indices = sorted({int(key.split(".")[1]) for key in state_dict if key.startswith("actor_mean.")})
    layers = []
    for n, i in enumerate(indices):
        out_features, in_features = state_dict[f"actor_mean.{i}.weight"].shape
        layers += [nn.Linear(in_features, out_features)] + ([nn.Tanh()] if n < len(indices) - 1 else [])
    actor = nn.Sequential(*layers)
    actor.load_state_dict({f"{2 * n}.{p}": state_dict[f"actor_mean.{i}.{p}"]
                           for n, i in enumerate(indices) for p in ("weight", "bias")})
    return actor


class ModelExpert:
    """The deterministic policy of a checkpoint written by these scripts.

    It executes what the trained system would: ``clip(base + scale * actor_mean)``, where the base comes from the
    inner experts rebuilt from the checkpoint's own metadata (e.g. the IK expert it was trained on), fused as in
    training (``util.compose_action``). A state policy ("mlp-state") is rebuilt here and reads the privileged
    state, so it serves every script. An image policy ("cnn-rgb-state") needs the run's cameras and the image
    scripts' network, which those scripts hand over as ``image_agent``.
    """

    def __init__(self, payload: dict, path: str, env_id: str, env, image_agent: Optional[type] = None):
        device = torch.device(env.device)
        meta = payload["meta"]
        check_checkpoint(payload, path, env_id=env_id, control_mode=env.control_mode)
        network, self.path, self.env_id = meta.get("network"), path, env_id
        if network == "cnn-rgb-state" and image_agent is None:
            raise UsageError(f"checkpoint '{path}' ({meta.get('script')}) acts from camera images; use it as the "
                             f"expert of ppo_rgb.py or ppo_rgb_fast.py")
        if network not in ("mlp-state", "cnn-rgb-state"):
            raise UsageError(f"checkpoint '{path}' holds network {network} (written by {meta.get('script')}); the "
                             f"model expert rebuilds mlp-state and cnn-rgb-state")
        train_args = meta["args"]
        self.inner = make_experts(train_args["expert_type"], env_id, env, ik_gain=train_args.get("ik_gain", 1.0),
                                  ik_calibration=calibration(train_args), model_path=train_args.get("model_path"),
                                  expert_fn=train_args.get("expert_fn"),
                                  image_agent=image_agent)
        self.fusion = train_args.get("fusion", "mean")
        action_dim = int(env.single_action_space.shape[0])
        check_checkpoint(payload, path, action_dim=action_dim + (len(self.inner) if self.fusion == "learned" else 0))
        if network == "mlp-state":
            self.actor = mlp_actor(payload["model"]).to(device)
            self.signature = dict(obs_dim=meta["obs_dim"])
            self.policy_obs_fn = state_of
        else:
            agent = image_agent(meta["rgb_shape"], meta["state_dim"], meta["action_dim"])
            agent.load_state_dict(payload["model"])
            self.actor = agent.to(device).get_action
            self.signature = dict(rgb_shape=meta["rgb_shape"], state_dim=meta["state_dim"])
            self.policy_obs_fn = image_policy_obs(env, train_args["include_state"])
        self.scale = meta["residual_scale"]
        self.scale_mode, self.scale_min = train_args.get("residual_scale_mode", "constant"), \
            train_args.get("residual_scale_min", 0.0)
        self.bounds = (torch.as_tensor(env.single_action_space.low, device=device),
                       torch.as_tensor(env.single_action_space.high, device=device))

    @torch.no_grad()
    def __call__(self, obs: dict) -> torch.Tensor:
        # as the wrapper trained it: the same experts, and under adaptive scaling the per-env scale
        expert_actions, env_scale = observe_experts(self.inner, obs, self.bounds, self.scale_mode, self.scale,
                                                    self.scale_min)
        policy_obs = experts_policy_obs(self.policy_obs_fn(obs), expert_actions, env_scale)
        signature = _obs_signature(policy_obs)
        if signature != self.signature:
            raise UsageError(f"checkpoint '{self.path}' was trained on observations {self.signature} but "
                             f"{self.env_id} gives {signature}")
        scale = self.scale if env_scale is None else env_scale
        return compose_action(expert_actions, self.actor(policy_obs), scale, self.fusion, bounds=self.bounds)[0]


def state_of(obs: dict) -> torch.Tensor:
    """ManiSkill's flat state observation, from a structured one; image runs carry camera data beside the state,
    which a state policy does not read."""
    return flat_state(dict(agent=obs["agent"], extra=obs["extra"]))


MODEL_FORMATS = ("a checkpoint of these scripts, a state dict of the Agent of ManiSkill's PPO baselines (ppo.py, "
                 "ppo_fast.py), a TorchScript module (torch.jit.save) or an exported program (torch.export.save)")
MANISKILL_DEFAULT_MODE = "pd_joint_delta_pos"


def read_model(path: str, device: torch.device = torch.device("cpu")) -> tuple[str, Any]:
    """What --model-path holds: ("suite", checkpoint), ("maniskill", state dict), ("torchscript", module) or
    ("exported", module), or a one-line UsageError saying why it is none of them. State dicts load with
    weights_only=True; TorchScript modules and exported programs are programs, loaded as such."""
    if not os.path.isfile(path):
        load_checkpoint(path)  # its one-line errors for a directory or a missing file
    names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
    try:
        if any("/code/__torch__/" in name for name in names):
            return "torchscript", torch.jit.load(path, map_location=device)
        if any(name.endswith("/archive_format") for name in names):
            return "exported", torch.export.load(path).module().to(device)
    except Exception as err:
        raise UsageError(f"model '{path}' cannot be loaded ({first_line(err)})") from None
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise UsageError(f"model '{path}' cannot be loaded ({first_line(err)}); expected {MODEL_FORMATS}") from None
    if isinstance(payload, dict) and "model" in payload and "meta" in payload:
        return "suite", payload
    keys = list(payload) if isinstance(payload, dict) else []
    keys = [k.removeprefix("_orig_mod.") for k in keys]
    if any(k.startswith("feature_net.") for k in keys):
        raise UsageError(f"model '{path}' is the Agent of ManiSkill's ppo_rgb.py (a NatureCNN on its "
                         f"FlattenRGBDObservationWrapper's images); its image observation is not rebuilt here, so "
                         f"only ManiSkill's state policies serve as experts")
    if keys and "actor_logstd" in keys and any(k.startswith("actor_mean.") for k in keys) and \
            all(k == "actor_logstd" or k.startswith(("actor_mean.", "critic.")) for k in keys):
        return "maniskill", {k.removeprefix("_orig_mod."): v for k, v in payload.items()}
    raise UsageError(f"model '{path}' has an unknown layout (keys {', '.join(keys[:4]) or 'none'}...); expected "
                     f"{MODEL_FORMATS}")


class StatePolicyExpert:
    """A policy trained elsewhere, acting from the flat "state" observation (ManiSkill's ``state`` obs mode, rebuilt
    from the privileged state the expert gets in every script): ManiSkill's PPO Agent by its deterministic actor
    mean, or a TorchScript module or exported program mapping [N, obs_dim] to [N, action_dim]. Its shapes are
    checked against the env on the first call, before anything is trained or written."""

    def __init__(self, policy: Callable, path: str, kind: str, env_id: str, env,
                 dims: Optional[tuple[int, int]] = None):
        self.policy, self.path, self.kind, self.env_id, self.dims = policy, path, kind, env_id, dims
        self.control_mode = env.control_mode
        self.action_dim = int(env.single_action_space.shape[0])
        self.checked = False

    def _mismatch(self, obs_dim: int, detail: str) -> UsageError:
        return UsageError(f"model '{self.path}' ({self.kind}) {detail}, but {self.env_id} in control mode "
                          f"{self.control_mode} gives {obs_dim}-dim state observations and takes "
                          f"{self.action_dim}-dim actions; --control-mode must be the one the policy was trained "
                          f"in (ManiSkill's baselines default to {MANISKILL_DEFAULT_MODE})")

    @torch.no_grad()
    def __call__(self, obs: dict) -> torch.Tensor:
        state = state_of(obs)
        if self.checked:
            return self.policy(state)
        if self.dims is not None and self.dims != (state.shape[1], self.action_dim):
            raise self._mismatch(state.shape[1], f"maps {self.dims[0]}-dim observations to {self.dims[1]}-dim actions")
        try:
            action = self.policy(state)
        except Exception as err:
            raise self._mismatch(state.shape[1], f"fails on a [{state.shape[0]}, {state.shape[1]}] observation "
                                                 f"({first_line(err)})") from None
        if not isinstance(action, torch.Tensor) or tuple(action.shape) != (state.shape[0], self.action_dim):
            shape = list(action.shape) if isinstance(action, torch.Tensor) else type(action).__name__
            raise self._mismatch(state.shape[1], f"returns {shape} for a [{state.shape[0]}, {state.shape[1]}] "
                                                 f"observation")
        self.checked = True
        return action.float()


def load_model_expert(path: str, env_id: str, env, image_agent: Optional[type] = None) -> ExpertFn:
    """The expert of --model-path, whichever of MODEL_FORMATS it is."""
    device = torch.device(env.device)
    kind, model = read_model(path, device)
    if kind == "suite":
        return ModelExpert(model, path, env_id, env, image_agent)
    if kind == "maniskill":
        actor = mlp_actor(model).to(device)
        dims = (actor[0].in_features, actor[-1].out_features)
        return StatePolicyExpert(actor, path, "ManiSkill PPO state dict", env_id, env, dims)
    return StatePolicyExpert(model, path, "TorchScript module" if kind == "torchscript" else "exported program",
                             env_id, env)


# ----------------------------------------------------------------------------------------------
# Custom experts and the factory
# ----------------------------------------------------------------------------------------------
def load_expert_fn(spec: str) -> ExpertFn:
    """``path/to/file.py:function`` or ``package.module:function`` -> the function."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise UsageError(f"--expert-fn must look like path/to/file.py:function or module:function, got '{spec}'")
    try:
        if source.endswith(".py"):
            if not os.path.isfile(source):
                raise UsageError(f"--expert-fn: no file '{source}'")
            module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(source))[0], source)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"--expert-fn: cannot import '{source}' ({type(err).__name__}: {err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"--expert-fn: '{source}' has no function '{name}'")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins publish none; their first call will tell
        return fn
    try:
        signature.bind(None)
    except TypeError:
        raise UsageError(f"--expert-fn: {spec} must take one argument, the observation; "
                         f"its signature is {name}{signature}") from None
    return fn


def expert_types(expert_type: str) -> list[str]:
    """``--expert-type ik,zero`` -> ["ik", "zero"], each a known type."""
    types = [t.strip() for t in expert_type.split(",")]
    for t in types:
        if t not in EXPERT_TYPES:
            raise _unknown_expert(t)
    return types


def default_control_mode(expert_type: str, env_id: str) -> str:
    """The control mode a run uses when --control-mode is not given: the IK expert's for the task if the list has
    it, else ManiSkill's default."""
    if "ik" in expert_types(expert_type):
        return ik_control_modes(env_id)[0]
    return "pd_joint_delta_pos"


def check_expert_args(expert_type: str, env_id: str, control_mode: str, model_path: Optional[str],
                      expert_fn: Optional[str], fusion: str = "mean") -> None:
    """Fail before any env is built or anything is written. ``expert_type`` may be a comma list."""
    types = expert_types(expert_type)
    try:  # library code raises ValueError; here it is the command line's mistake
        check_fusion(fusion, len(types))
        if "ik" in types:
            IKExpert(env_id, control_mode)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if "model" in types:
        if not model_path:
            raise UsageError(f"--expert-type model needs --model-path FILE: {MODEL_FORMATS}")
        kind, model = read_model(model_path)
        if kind == "suite":
            check_checkpoint(model, model_path, env_id=env_id, control_mode=control_mode)
    if "custom" in types:
        if not expert_fn:
            raise UsageError("--expert-type custom needs --expert-fn path/to/file.py:function")
        load_expert_fn(expert_fn)


def make_expert(expert_type: str, env_id: str, env, ik_gain: float = 1.0,
                ik_calibration: Optional[CalibrationError] = None, model_path: Optional[str] = None,
                expert_fn: Optional[str] = None, image_agent: Optional[type] = None) -> ExpertFn:
    """Build one expert named on the command line for a backend env (``util.make_env``). ``image_agent``: the
    image scripts' Agent class, which a model expert needs to rebuild an image checkpoint."""
    if expert_type == "zero":
        return ZeroExpert(int(env.single_action_space.shape[0]))
    if expert_type == "ik":
        return IKExpert(env_id, env.control_mode, ik_gain, ik_calibration)
    if expert_type == "model":
        return load_model_expert(model_path, env_id, env, image_agent)
    if expert_type == "custom":
        return load_expert_fn(expert_fn)
    raise _unknown_expert(expert_type)


def make_experts(expert_type: str, env_id: str, env, **kwargs) -> list[ExpertFn]:
    """The experts of ``--expert-type``, a comma list such as ``ik,zero``; ``kwargs`` as for make_expert."""
    return [make_expert(t, env_id, env, **kwargs) for t in expert_types(expert_type)]
