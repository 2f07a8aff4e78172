"""LLaVA's conversation templates (llava/conversation.py), the one copy that the runtime and train/ share.

A prompt is plain text in which IMAGE marks where an image's features go. The engine swaps IMAGE for
libmtmd's media marker; train/ swaps it for the image token the model was given.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# Suffixes of LLaVA's evaluation prompts (llava/eval/*).
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Template:
    """One conversation layout.

    Role templates ("two" separator style): SYSTEM<sep>USER: text<sep>ASSISTANT: answer<eos>USER: ...
    The plain template (stage-1 pre-training) has no system text and no roles: IMAGE caption "\\n".
    """

    name: str
    system: str = ""
    user_role: str = ""
    assistant_role: str = ""
    sep: str = "\n"
    end_of_answer: str = "\n"

    @property
    def has_roles(self) -> bool:
        return bool(self.user_role)

    def opening(self, system: str | None = None) -> str:
        """Text before the first turn: the system prompt and its separator."""
        if not self.has_roles:
            return ""
        text = self.system if system is None else system
        return text + self.sep

    def question(self, text: str, n_images: int = 0) -> str:
        """One user turn, ending where the model starts to answer.

        Images go first, each on its own line, as LLaVA places `<image>\\n` before the question.
        """
        if not self.has_roles:
            return IMAGE * n_images + text
        images = (IMAGE + "\n") * n_images
        return f"{self.user_role}: {images}{text}{self.sep}{self.assistant_role}:"

    def answer(self, text: str) -> str:
        """An assistant turn as it follows question(): the answer and its end marker."""
        if not self.has_roles:
            return text + self.end_of_answer
        return " " + text + self.end_of_answer

    def render(self, turns: list[Turn], system: str | None = None) -> str:
        """A whole conversation; the last turn may be unanswered (a generation prompt)."""
        out = [self.opening(system)]
        for turn in turns:
            out.append(self.question(turn.user, turn.images))
            if turn.assistant is not None:
                out.append(self.answer(turn.assistant))
        return "".join(out)


@dataclass
class Turn:
    user: str
    images: int = 0
    assistant: str | None = None


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("vicuna_v1", VICUNA_SYSTEM, "USER", "ASSISTANT", " ", "</s>"),
        Template("llava_v1", LLAVA_V1_SYSTEM, "USER", "ASSISTANT", " ", "</s>"),
        Template("plain"),
    )
}
DEFAULT_TEMPLATE = "vicuna_v1"


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; choose one of: {', '.join(TEMPLATES)}") from None


__all__ = [
    "DEFAULT_TEMPLATE",
    "IMAGE",
    "OPTION_LETTER",
    "SHORT_ANSWER",
    "TEMPLATES",
    "Template",
    "Turn",
    "get_template",
]
