"""The model card of a densified student: how it was made, in prose and tables, from its plan (m2d_plan.json)."""

from __future__ import annotations

from pathlib import Path

from megatron_m2d.io.model_card import new_card, public_name, table

# the paper's names, so a reader of the card can find the method in the literature
SCORING_NAMES = {"selection_freq": "selection frequency (SF)", "preselect_prob": "pre-selection probability (PP)",
                 "postselect_prob": "post-selection probability (PS)",
                 "conditional_prob": "conditional probability (CP)",
                 "reap": "REAP activation-weighted criterion (ACP)", "gram_logdet": "D-optimal selection on CP (DO-CP)",
                 "gld_reap": "D-optimal selection on ACP (DO-ACP)", "random": "seeded random selection (control)"}
GRAM_NAMES = {"all": "all-token Gram", "gated": "gate-weighted Gram"}


def densify_card(plan: dict, model_dir: Path, name: str, teacher_dir: Path) -> str:
    teacher, method, student, calib = plan["teacher"], plan["method"], plan["student"], plan["calibration"]
    teacher_name = public_name(teacher["name"])
    layout = {
        "dense": f"It is a standard `{student['architecture']}`: every runtime that serves that class serves it.",
        "one_expert": (f"It is a `{student['architecture']}` with ONE expert of width {student['width']} and top-1 "
                       "routing (its softmax weight is exactly 1.0), because transformers has no dense class with "
                       "this family's attention and norms; the compute is dense."),
    }[student["layout"]]
    summary = (f"A dense student of the {teacher['model_type']} Mixture-of-Experts `{teacher_name}` "
               f"({teacher['num_experts']} experts, top-{teacher['top_k']}, expert width {teacher['expert_width']}), "
               f"made by megatron_m2d: {method['select']} experts kept per layer by "
               f"{SCORING_NAMES.get(method['scoring'], method['scoring'])}, grouped into {method['groups']} and "
               "merged, "
               f"then concatenated into one FFN of width {student['width']}. {layout}")
    settings = {"scoring": f"`{method['scoring']}`: {SCORING_NAMES.get(method['scoring'], '')}",
                "experts kept per layer (K)": method["select"], "groups = dense width in experts (k)": method["groups"],
                "grouping": f"`{method['grouping']}`" + (" (no effect: K = k)"
                                                         if method["select"] == method["groups"] else ""),
                "merge": f"`{method['merge']}`" + (f", alpha {method['merge_alpha']}"
                                                   if method["merge"] == "partial" else ""),
                "down-projection scaling": f"`{method['scaling']}`", "seed": method["seed"]}
    if "cp" in method:
        settings["conditional probability"] = f"`{method['cp']}`: " + {
            "probability": "mean softmax probability where selected (Eq. 3)",
            "routing_weight": "mean routing weight applied where selected"}.get(method["cp"], "")
    if method["scoring"] in ("gram_logdet", "gld_reap"):
        kernel = method["kernel"]
        gram = kernel["gram"] if kernel["gram"] != "auto" else ("all" if calib.get("gram") else "gated")
        settings["D-optimal kernel"] = (f"{GRAM_NAMES[gram]}, activation weights "
                                        f"`{kernel['activation']}`, ridge {kernel['lambda_scale']} x mean(diag K) / "
                                        + ("K" if kernel.get("ridge", "selected") == "selected" else "k"))
    calibration = (f"Routing statistics were recorded over {calib['tokens']:,} tokens of "
                   f"`{public_name(calib['data'])}` "
                   f"(sequences of {calib['seq_len']}, seed {calib['seed']}"
                   + (", with the all-token Gram: every expert run on every token" if calib.get("gram") else "")
                   + "), one decoder layer at a time.")
    made = "\n\n".join([calibration, table(settings, ("method", "setting")),
                        "The full plan (merge weights, importance scores) is in `m2d_plan.json`."])
    layers = ["| layer | kept, most important first | groups | down-projection scales |", "|---|---|---|---|"]
    for layer, p in plan["layers"].items():
        groups = "; ".join(" + ".join(str(e) for e in g) for g in p["groups"])
        layers.append(f"| {layer} | {', '.join(str(e) for e in p['selected'])} | {groups} | "
                      f"{', '.join(f'{s:.4g}' for s in p['scales'])} |")
    facts = {"class": f"`{student['architecture']}`", "FFN width": student["width"], "teacher": f"`{teacher_name}`",
             "size": f"{student['bytes'] / 1e6:,.1f} MB"}
    return new_card(teacher=teacher["name"], teacher_dir=teacher_dir, model_dir=model_dir, name=name,
                    title=f"Dense student of {teacher_name}", summary=summary, facts=facts,
                    made=[("How it was made", made), ("Kept experts per MoE layer", "\n".join(layers))],
                    tags=["moe-to-dense", "pruning", "expert-merging"])

