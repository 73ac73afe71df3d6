import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import * as path from 'node:path';

import { Blip2ForConditionalGeneration } from '../lib';
import { expected, fixtureTensor, ids, rowsOf } from './support/fixtures';
import { TINY_OPT_CHECKPOINT, cached, exporterInputs, runExporter, runPython } from './support/python';

/**
 * The fixture checkpoint rewritten by the exporter's own checkpoint writer in another format,
 * then exported and run: the tokens must still be transformers'.
 */
function rewrittenCheckpoint(format: 'sharded-safetensors' | 'pytorch-bin' | 'float16-safetensors'): string {
  return cached(`checkpoint-${format}`, (out) => {
    runPython(`
import os, shutil, json, torch
from safetensors.torch import load_file, save_file
src = ${JSON.stringify(TINY_OPT_CHECKPOINT)}
out = ${JSON.stringify(out)}
os.makedirs(out)
for name in os.listdir(src):
    if name != "model.safetensors":
        shutil.copy(os.path.join(src, name), out)
tensors = load_file(os.path.join(src, "model.safetensors"))
fmt = ${JSON.stringify(format)}
if fmt == "sharded-safetensors":
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in part}, os.path.join(out, file))
        weight_map.update({k: file for k in part})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
elif fmt == "pytorch-bin":
    torch.save(tensors, os.path.join(out, "pytorch_model.bin"))
else:
    save_file({k: v.half() for k, v in tensors.items()}, os.path.join(out, "model.safetensors"))
`);
  }, exporterInputs());
}

describe('checkpoint formats through the exporter', () => {
  for (const format of ['sharded-safetensors', 'pytorch-bin'] as const) {
    it(`${format}: exported and run, greedy and beam tokens equal transformers'`, async () => {
      const checkpoint = rewrittenCheckpoint(format);
      const modelDir = cached(`model-${format}`, (out) => runExporter([checkpoint, out]), [checkpoint]);
      const model = await Blip2ForConditionalGeneration.fromPretrained(modelDir);
      for (const g of expected().generations.filter((x) => x.image === 'shapes')) {
        const out = await model.generate(
          { pixelValues: fixtureTensor(`pixel_values/${g.image}`), inputIds: ids(g.input_ids), attentionMask: ids(g.attention_mask) },
          { maxNewTokens: g.kwargs.max_new_tokens as number, minNewTokens: g.kwargs.min_new_tokens as number | undefined, numBeams: g.kwargs.num_beams as number | undefined },
        );
        assert.deepEqual((await rowsOf(out))[0].slice(g.input_ids[0].length), g.sequences[0].slice(1), g.name);
      }
      model.dispose();
    });
  }

  it('a float16 checkpoint exports to float32 on request and loads', async () => {
    const checkpoint = rewrittenCheckpoint('float16-safetensors');
    const modelDir = cached('model-float16-to-float32', (out) => runExporter([checkpoint, out, '--dtype', 'float32']), [checkpoint]);
    const manifest = JSON.parse(fs.readFileSync(path.join(modelDir, 'manifest.json'), 'utf8'));
    assert.equal(manifest.dtype, 'float32');
    const model = await Blip2ForConditionalGeneration.fromPretrained(modelDir);
    const out = await model.generate({ pixelValues: fixtureTensor('pixel_values/noise') }, { maxNewTokens: 6 });
    assert.deepEqual(out.shape, [1, 13]);
    model.dispose();
  });
});
