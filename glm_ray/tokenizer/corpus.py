"""Built-in training text for the test tokenizer.

A few kilobytes of English prose, Python, JSON and CJK written for this project. It only has to be
varied enough that a byte-level BPE trained on it learns common words as single tokens; the exact
content is part of the tokenizer's identity, so editing it changes every generated vocabulary.
"""

ENGLISH = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the forest.
Hello, world! How are you today? I am fine, thank you. What is the weather like in the city?
The weather is sunny and warm today, with a light wind from the west. Tomorrow it will rain.
Please tell me a short story about a robot who wants to learn how to paint.
Once upon a time there was a small robot that lived in a quiet town by the sea. Every morning the
robot walked to the market, where people sold fruit, bread, fish and flowers. One day the robot saw
a painter at the corner of the street and asked her to teach it how to paint the light on the water.
She said that the first thing to learn is to look, and the second thing is to look again.
The model answers questions, writes code, and explains its reasoning step by step.
A user asks the assistant a question, and the assistant thinks before it answers the user.
You are a helpful assistant. Answer the question as clearly and briefly as you can.
If you need more information, call one of the tools and wait for the result before you answer.
The server receives a request, schedules the sequence, runs the model, and streams the tokens back.
Each request has a prompt, a maximum number of new tokens, a temperature, and a list of stop strings.
The scheduler decides which sequences run in the next step and how many blocks of memory they need.
When memory runs out, the scheduler may preempt a sequence and run it again later from the start.
This is a test of the system. It should work for any text, including numbers like 0, 1, 2, 3, 10,
42, 100, 256, 1024, 2048, 65536 and 3.14159, dates like 2024-06-27, and times like 12:30 or 08:15.
There are many ways to solve a problem, but the best one is usually the simplest one that works.
Why do we test code? Because we want to know that it does what we think it does, today and later.
People who write good software read a lot of code, and they write code that other people can read.
Mixture of experts models route every token to a small number of experts chosen by a router network.
The attention layer uses rotary position embeddings, grouped query attention and a key value cache.
"""

CODE = '''\
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Request:
    request_id: str
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    stop: list[str] = field(default_factory=list)


def get_weather(city: str, date: Optional[str] = None) -> dict[str, Any]:
    """Return the weather for a city on a given date."""
    if not city:
        raise ValueError("city must not be empty")
    return {"city": city, "date": date, "weather": "sunny", "temp": 26}


class Scheduler:
    def __init__(self, max_num_seqs: int = 8) -> None:
        self.max_num_seqs = max_num_seqs
        self.waiting: list[Request] = []
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> list[Request]:
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        return list(self.running)


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(value - top) for value in values]
    total = sum(exps)
    return [value / total for value in exps]


for index, item in enumerate(range(10)):
    if index % 2 == 0:
        print(f"index={index} item={item}")
    else:
        continue

result = json.dumps({"name": "get_weather", "arguments": {"city": "Beijing"}}, ensure_ascii=False)
assert json.loads(result)["name"] == "get_weather"
'''

JSON = """\
{"type": "function", "function": {"name": "get_weather", "description": "Get the weather of a city.",
 "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "date": {"type": "string"}},
 "required": ["city"]}}}
{"id": "chatcmpl-123", "object": "chat.completion", "created": 1700000000, "model": "glm-4.6",
 "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
 "finish_reason": "stop"}], "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}}
"""

CJK = """\
你好，世界！今天天气怎么样？北京明天的天气是晴天，气温二十六度。
我是一个人工智能助手，可以回答问题、写代码、翻译文章。请问有什么可以帮你的吗？
中国的首都是北京。上海是一个很大的城市。我们明天去公园散步吧。
人工智能模型需要大量的数据和计算资源。这个问题很有意思，我们一起来想一想。
こんにちは、世界。今日はいい天気ですね。私は学生です。東京に住んでいます。
ありがとうございます。これはテストの文章です。日本語も少し話せます。
안녕하세요. 만나서 반갑습니다. 오늘 날씨가 좋네요. 감사합니다.
Emoji and symbols: 😀 😂 👍 🎉 ❤️ ✅ → ← ★ € £ ¥ © ° ± × ÷ …
— “quoted” ‘text’ café naïve résumé.
"""

TRAINING_TEXT = ENGLISH + CODE + JSON + CJK
