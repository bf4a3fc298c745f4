"""A terminal chat that serves answers from Flywheel and collects feedback on them.

Each line you type is a prompt; after its answer (and the policy version that wrote it) type
y or n for thumbs up or down, 1-3 for a rating, or just Enter to skip. Works with piped input:
    printf 'how do I bake bread?\ny\nwhere is my order?\n3\n' | python examples/chat.py
"""

import argparse
import os

from flywheel.client import Client, FlywheelError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", help="policy gRPC address (default: FLYWHEEL_POLICY_ADDR or 127.0.0.1:50051)")
    ap.add_argument("--feedback", help="feedback gRPC address (default: FLYWHEEL_FEEDBACK_ADDR or 127.0.0.1:50052)")
    ap.add_argument("--user", default="alice", help="the end user's id (feedback comes from the same user)")
    ap.add_argument("--api-key", default=os.environ.get("FLYWHEEL_API_KEY"), help="default: FLYWHEEL_API_KEY")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    with Client(args.policy, args.feedback, api_key=args.api_key) as client:
        while True:
            try:
                prompt = input("you> ").strip()
            except EOFError:
                return
            if not prompt:
                continue
            answer = client.generate(prompt, args.user, max_new_tokens=args.max_new_tokens)
            print(f"flywheel (policy v{answer.policy_version})> {answer.text.strip()}")
            try:
                vote = input("good answer? y/n, or rate 1-3 (Enter: skip)> ").strip().lower()
            except EOFError:
                return
            try:
                if vote in ("y", "n"):
                    print("feedback:", client.thumbs(answer, up=vote == "y").status)
                elif vote in ("1", "2", "3"):
                    print("feedback:", client.rate(answer, int(vote)).status)
            except FlywheelError as e:  # e.g. rate-limited after the client's retries: say so and go on
                print("feedback not recorded:", e.message)


if __name__ == "__main__":
    main()
