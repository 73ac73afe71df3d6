import { Blip2ForConditionalGeneration } from '../../lib';

/** Loads a model with BLIP2_LINEAR_KERNEL set to `mode` for that load only ('off': libtorch's ops alone). */
export async function loadWithKernelMode(modelDir: string, mode: 'auto' | 'on' | 'onednn' | 'off'): Promise<Blip2ForConditionalGeneration> {
  process.env.BLIP2_LINEAR_KERNEL = mode;
  try {
    return await Blip2ForConditionalGeneration.fromPretrained(modelDir);
  } finally {
    delete process.env.BLIP2_LINEAR_KERNEL;
  }
}
