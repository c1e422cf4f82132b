"""Chat with a SafeVLM checkpoint: print the safety verdict and the gated answer for an image and a prompt.

    python examples/chat.py --model demo_output/checkpoint --image photo.png --prompt "What is shown here?" \
        [--profile minor] [--policy my_policy.json] [--max-new-tokens 64] [--no-gating]

Without --image the prompt is assessed and answered as text only. The checkpoint is loaded with
`trust_remote_code=True`, exactly as a user who never installed safevlm-hf would.
"""

import argparse
import json

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Saved SafeVLM folder or Hub id.")
    parser.add_argument("--image", default=None, help="Image file (optional).")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--profile", default=None, help="Policy profile, e.g. default, adult, minor.")
    parser.add_argument("--policy", default=None, help="JSON file with a policy replacing the checkpoint's.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-gating", action="store_true", help="Explicit deployer opt-out of refusal gating.")
    args = parser.parse_args()

    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    policy = json.loads(open(args.policy).read()) if args.policy else None
    content = ([{"type": "image"}] if args.image else []) + [{"type": "text", "text": args.prompt}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    image = Image.open(args.image).convert("RGB") if args.image else None
    inputs = processor(images=image, text=prompt, return_tensors="pt")

    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            safety_profile=args.profile,
            safety_policy=policy,
            safety_gating=not args.no_gating,
            return_dict_in_generate=True,
        )
    answer = processor.decode(output.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if not args.no_gating:
        verdict = output.safety_verdicts[0]
        top = sorted(verdict.type_probs.items(), key=lambda kv: -kv[1])[:3]
        print(f"verdict : {verdict.category}, level {verdict.level} -> {verdict.action} (profile {verdict.profile})")
        print("types   : " + ", ".join(f"{name} {p:.2f}" for name, p in top))
    print(f"USER     : {args.prompt}")
    print(f"ASSISTANT: {answer.strip()}")


if __name__ == "__main__":
    main()
