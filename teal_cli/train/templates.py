"""Prompt templates for stage-2 instruction data: one task -> a list of prompts.

TEAL's stage 2 (§3.3 of the paper) tunes on instruction data rendered through prompt
templates, one sampled per example, so the model learns the task rather than one wording.
A template is a string; ``{input}`` marks where the record's prompt segments go (image,
audio or text, in their order). A template without ``{input}`` is an instruction placed
before them. The target segments follow the rendered prompt, unchanged::

    {"id": "7", "task": "caption", "segments": [
      {"modality": "image", "codec": "patch-p2-k64", "tokens": [...]},
      {"modality": "text", "text": "a handwritten seven"}]}
    # with "{input}\\nWhat does this image show?" becomes
    # <img> ... </img> "\\nWhat does this image show?" | target: "a handwritten seven" EOS

A templates file is JSON, ``{"task": ["prompt", ...], ...}``; its tasks replace built-in
ones of the same name and add new ones. Braces other than ``{input}`` are literal text.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError, UsageError
from ..records import Record, Segment

PLACEHOLDER = "{input}"

BUILTIN: dict[str, list[str]] = {
    "caption": [
        "{input}\nDescribe this image in a few words:",
        "{input}\nWhat does this image show?",
        "{input}\nA short caption for the image:",
        "Describe the image below.\n{input}\n",
        "{input}\nWrite a caption for this picture.",
        "Look at the image and say what it shows.\n{input}\n",
        "{input}\nIn one sentence, what is in this image?",
        "Caption this image: {input}\n",
        "{input}\nSummarise the picture briefly:",
        "Image: {input}\nDescription:",
        "{input}\nWhat can you see here?",
        "Give a brief description of this image.\n{input}\n",
    ],
    "asr": [
        "{input}\nTranscribe this speech:",
        "{input}\nWhat is being said?",
        "Write down what the speaker says.\n{input}\n",
        "{input}\nTranscript:",
        "Transcribe the audio below.\n{input}\n",
        "{input}\nConvert this recording to text.",
        "Audio: {input}\nText:",
        "{input}\nWhat words are spoken in this clip?",
        "Listen and write what you hear.\n{input}\n",
        "{input}\nRecognise the speech:",
        "Speech: {input}\nTranscription:",
    ],
    "text-to-image": [
        "Draw an image of: {input}\n",
        "Generate a picture of {input}\n",
        "Make an image that shows {input}\n",
        "{input}\nDraw this.",
        "Create an image: {input}\n",
        "Paint {input}\n",
        "Picture this: {input}\nImage:",
        "An image of {input}:",
        "Show me {input}\n",
        "Render an image for the description: {input}\n",
        "Text: {input}\nImage:",
    ],
    "text-to-speech": [
        "Say this aloud: {input}\n",
        "Read the following text: {input}\n",
        "Speak: {input}\n",
        "{input}\nPronounce this.",
        "Turn this text into speech: {input}\n",
        "Synthesise speech for: {input}\n",
        "Text: {input}\nSpeech:",
        "Say the words {input}\n",
        "Read out loud: {input}\n",
        "Convert to audio: {input}\n",
        "Please say {input}\n",
    ],
    "image-to-speech": [
        "{input}\nSay aloud what this image shows.",
        "{input}\nRead this out loud:",
        "Look at the image and say what it shows.\n{input}\nSpeech:",
        "{input}\nDescribe the picture in speech.",
        "Image: {input}\nSpoken:",
        "Say what you see: {input}\n",
        "{input}\nName this aloud.",
        "Speak about this image.\n{input}\n",
        "{input}\nWhat is this? Answer in speech.",
        "Read the image below aloud.\n{input}\n",
        "{input}\nVoice what the picture shows:",
    ],
    "mcq": [
        "{input}\nAnswer with the letter of the correct option.",
        "{input}\nWhich option is right? Reply with its letter.",
        "Choose the correct answer.\n{input}\nAnswer:",
        "{input}\nThe correct option is",
        "Question: {input}\nAnswer:",
        "{input}\nPick one option and give its letter.",
        "Read the question and select the best answer.\n{input}\n",
        "{input}\nSelect the right choice:",
        "Multiple choice: {input}\nYour answer:",
        "{input}\nReply with A, B, C or D.",
        "Answer the question below with one letter.\n{input}\n",
    ],
}


def load_templates(path: str | Path | None = None) -> dict[str, list[str]]:
    """The built-in templates, with those of the JSON file ``path`` replacing or adding tasks.

    Raises DataError naming the file for unreadable JSON, a task without prompts, a prompt
    that is not a string or holds ``{input}`` more than once."""
    templates = {task: list(prompts) for task, prompts in BUILTIN.items()}
    if path is None:
        return templates
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--templates {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the templates file ({exc})") from None
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{path}: expected a JSON object mapping each task to a list of prompts")
    for task, prompts in obj.items():
        if not isinstance(prompts, list) or not prompts:
            raise DataError(f"{path}: task '{task}': expected a non-empty list of prompt strings")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{path}: task '{task}' prompt {i}: expected a non-empty string")
            if prompt.count(PLACEHOLDER) > 1:
                raise DataError(f"{path}: task '{task}' prompt {i}: {PLACEHOLDER} appears more than once")
        templates[task] = list(prompts)
    return templates


def template_pieces(template: str) -> tuple[str, str]:
    """``(before, after)``: the template's text around ``{input}`` (all of it before when absent)."""
    if PLACEHOLDER in template:
        before, after = template.split(PLACEHOLDER)
        return before, after
    return template, ""


def render(record: Record, template: str | None, roles: list[str]) -> Record:
    """``record`` with ``template`` wrapped around its leading prompt segments.

    Args:
        record: an instruction record.
        template: a prompt template, or None to keep the record's own wording.
        roles: ``prompt`` / ``target`` per segment (:func:`teal_cli.model.teal_model.segment_role`).

    Returns a new record whose every segment carries an explicit ``role``; the template's
    text pieces are prompt text segments placed around the prompt segments that precede
    the first target. Later segments keep their place and role.
    """
    first_target = roles.index("target") if "target" in roles else len(roles)
    segments = [_with_role(s, r) for s, r in zip(record.segments, roles)]
    if template is not None:
        before, after = template_pieces(template)
        head = [Segment(modality="text", text=before, extra={"role": "prompt"})] if before else []
        tail = [Segment(modality="text", text=after, extra={"role": "prompt"})] if after else []
        segments = head + segments[:first_target] + tail + segments[first_target:]
    return Record(id=record.id, segments=segments, extra=dict(record.extra))


def _with_role(segment: Segment, role: str) -> Segment:
    return segment.with_role(role)
