"""How an ELI5 record becomes text, and how a question becomes a prompt.

Shared by `sources.py` (an ELI5 record's training text) and `sample.py --interactive` (a question's
prompt, `qa_prompt`), so a model fine-tuned on the `qa` format is prompted exactly the way it was
trained.
"""

from __future__ import annotations

FORMATS = ("answers", "qa")


def answers_text(answers: list[str]) -> str:
    """The published recipe: all of a record's answers joined with one space. A str or a dict (the
    record's whole "answers" field, not its "text" list) is refused: joined, it would be its letters
    or its keys."""
    if isinstance(answers, (str, dict)):
        raise TypeError(f"answers: a list of answer texts (a record's answers['text']), got {type(answers).__name__}")
    return " ".join(answers)


def qa_prompt(question: str) -> str:
    """The `qa` template up to where the model takes over:

        Question: <question>
        Answer:
    """
    return f"Question: {question.strip()}\nAnswer:"


def qa_text(question: str, answer: str) -> str:
    """A whole `qa` document: the prompt, a space, the answer (the data pipeline appends EOS)."""
    return f"{qa_prompt(question)} {answer.strip()}"
