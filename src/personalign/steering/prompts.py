"""Project-written prompts for steering recipes and the steering evaluation (redistributable).

Everyday questions whose good answers can be short or long, plain or structured, so every
objective has room to move. :func:`split` holds out whole topics: a recipe trains on the
``train`` topics and the harness measures on the ``heldout`` ones.
"""

from __future__ import annotations

TOPICS: dict[str, tuple[str, ...]] = {
    "cooking": (
        "How do I cook rice on the stove?",
        "What can I make for dinner with eggs and spinach?",
        "How do I keep bread fresh longer?",
        "Why does my pancake batter need to rest?",
    ),
    "fitness": (
        "How should a beginner start running?",
        "Is it better to stretch before or after exercise?",
        "How many rest days do I need each week?",
        "What is a simple home workout?",
    ),
    "money": (
        "How do I make a monthly budget?",
        "What is an emergency fund?",
        "Should I pay off debt or save first?",
        "How does compound interest work?",
    ),
    "computers": (
        "Why is my laptop getting slow?",
        "What is the difference between RAM and storage?",
        "How do I back up my photos?",
        "What is a password manager?",
    ),
    "science": (
        "Why is the sky blue?",
        "How do vaccines work?",
        "What causes the seasons?",
        "Why do cats purr?",
    ),
    "work": (
        "How do I prepare for a job interview?",
        "How can I run a better meeting?",
        "How do I ask my manager for feedback?",
        "How do I write a good email to a client?",
    ),
    "travel": (
        "What should I pack for a weekend trip?",
        "How do I deal with jet lag?",
        "How can I travel on a small budget?",
        "What should I know before renting a car abroad?",
    ),
    "home": (
        "How do I get rid of fruit flies?",
        "How often should I water a cactus?",
        "How do I unclog a drain?",
        "How can I make a small room feel bigger?",
    ),
    "learning": (
        "How can I learn a new language faster?",
        "What is a good way to take notes?",
        "How do I stay focused while studying?",
        "How do I start learning to play guitar?",
    ),
    "health": (
        "How can I sleep better?",
        "How much water should I drink a day?",
        "What are good habits for healthy eyes?",
        "How do I reduce stress at work?",
    ),
    "writing": (
        "How do I write a short story?",
        "How do I make my writing clearer?",
        "What makes a good presentation?",
        "How do I write a thank-you note?",
    ),
    "pets": (
        "How do I train a puppy to sit?",
        "What should I feed a pet rabbit?",
        "How do I introduce a new cat to my home?",
        "How often should I walk my dog?",
    ),
    "gardening": (
        "How do I start a vegetable garden?",
        "When should I plant tomatoes?",
        "How do I make compost?",
        "Why are my plant's leaves turning yellow?",
    ),
    "history": (
        "Why did the Roman Empire fall?",
        "What was the Industrial Revolution?",
        "Who invented the printing press and why did it matter?",
        "What was the Silk Road?",
    ),
    "social": (
        "How do I make friends in a new city?",
        "How do I politely decline an invitation?",
        "How can I be a better listener?",
        "How do I apologise to a friend?",
    ),
    "cars": (
        "How do I check my tyre pressure?",
        "What does an oil change do?",
        "How can I save fuel when driving?",
        "What should I do if my car battery dies?",
    ),
    "math": (
        "What is a prime number?",
        "How do I calculate a percentage?",
        "What is the Pythagorean theorem?",
        "What is the difference between mean and median?",
    ),
    "music": (
        "How do I read sheet music?",
        "What is a chord?",
        "How can I practise singing at home?",
        "What makes a song catchy?",
    ),
}
HELDOUT_TOPICS = ("science", "home", "social", "math", "music", "pets")


def split() -> tuple[list[str], list[str]]:
    """``(train, heldout)`` prompts; held-out topics never appear in training."""
    train = [p for topic, prompts in TOPICS.items() if topic not in HELDOUT_TOPICS for p in prompts]
    heldout = [p for topic in HELDOUT_TOPICS for p in TOPICS[topic]]
    return train, heldout
