"""`pipeline("performer-text2text")`: translation / summarisation with a Performer seq2seq model.

transformers 5 removed the text2text-generation, summarization and translation tasks and their
names cannot be registered again, so this pipeline has a name of its own. Importing
`modeling_performer` registers it.

```python
>>> from transformers import pipeline
>>> translate = pipeline("performer-text2text", model="path/to/seq2seq-folder")  # doctest: +SKIP
>>> translate("In the beginning God created the heaven and the earth.", max_new_tokens=40)  # doctest: +SKIP
[{'generated_text': '...'}]

```
"""

from transformers import AutoModelForSeq2SeqLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

TASK = "performer-text2text"


class PerformerText2TextPipeline(Pipeline):
    """Tokenise the source, `generate` with the model's generation config (plus any keyword
    given to the call), decode without special tokens."""

    _pipeline_calls_generate = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, truncation=None, max_length=None, **generate_kwargs):
        preprocess = {}
        if truncation is not None:
            preprocess["truncation"] = truncation
        if max_length is not None:
            preprocess["max_length"] = max_length
        return preprocess, generate_kwargs, {}

    def preprocess(self, text, truncation=True, max_length=None):
        if not isinstance(text, str):
            raise ValueError(f"{TASK} takes a string (or a list of strings), got {type(text).__name__}")
        return self.tokenizer(text, return_tensors="pt", truncation=truncation, max_length=max_length)

    def _forward(self, model_inputs, **generate_kwargs):
        return {"output_ids": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs):
        return [{"generated_text": self.tokenizer.decode(ids, skip_special_tokens=True)}
                for ids in model_outputs["output_ids"]]


def register():
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=PerformerText2TextPipeline, pt_model=AutoModelForSeq2SeqLM,
                                        type="text")
