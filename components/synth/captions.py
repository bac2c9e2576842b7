"""Captions of test-bed images: an identity's visible factors, the expression, pose and background in words."""

from __future__ import annotations

from components.synth.identities import Identity, Motion

EXPRESSION_PHRASES = {
    "neutral": "with a neutral expression", "happy": "smiling", "surprised": "looking surprised",
    "sad": "looking sad", "angry": "looking angry",
}


def caption(identity: Identity, motion: Motion) -> str:
    """A short caption naming the identity's visible factors, the expression, pose and background."""
    extras = []
    if identity.hair_style == "bald":
        if not identity.hat:
            extras.append("a bald head")
    elif identity.hat:  # only the colour shows under a hat
        extras.append(f"{identity.hair_name} hair")
    elif identity.hair_style == "buzz":
        extras.append(f"a {identity.hair_name} buzz cut")
    else:
        extras.append(f"{identity.hair_style} {identity.hair_name} hair")
    if identity.beard:
        extras.append(f"a {identity.beard}")
    if identity.glasses:
        extras.append("glasses")
    parts = ["a photo of a person"]
    if extras:
        text = extras[0] if len(extras) == 1 else ", ".join(extras[:-1]) + " and " + extras[-1]
        parts[0] += f" with {text}"
    if identity.hat:
        parts.append(f"wearing a {identity.hat} hat")
    parts.append(EXPRESSION_PHRASES[motion.expression])
    parts.append(_pose_phrase(motion))
    parts.append(f"on a {motion.background_name} background")
    return ", ".join(parts)


def _pose_phrase(motion: Motion) -> str:
    if abs(motion.yaw) >= 10:
        side = "left" if motion.yaw > 0 else "right"
        return f"head turned {'slightly ' if abs(motion.yaw) < 25 else ''}to their {side}"
    if abs(motion.pitch) >= 8:
        return "looking up" if motion.pitch > 0 else "looking down"
    return "facing the camera"
