"""GPT-MoE pretraining with Megatron's own training loop (megatron.training.pretrain, Megatron-Core
0.17+ wheels): this file only provides the model, the batches and the loss, as Megatron-LM's
pretrain_gpt.py does; every flag is Megatron's. It knows nothing of moe-lbl: launch it through
the launcher to balance globally.

    torchrun --nproc_per_node 8 -m moe_lbl.run --scope global -- examples/pretrain_gpt_moe.py \\
        --num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-experts 8 --moe-router-topk 2 \\
        --moe-aux-loss-coeff 1e-2 --seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 \\
        --global-batch-size 32 --train-iters 100 --lr 3e-4 --mock-data --tokenizer-type NullTokenizer \\
        --vocab-size 128 --bf16

Data: Megatron's mock dataset (--mock-data) or its indexed datasets (--data-path); batches are
read on every rank (tensor-parallel size 1 in this sketch; pretrain_gpt.py broadcasts them).
"""

from functools import partial

import torch


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """A GPTModel with the local or TransformerEngine layer spec, as --transformer-impl says."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    config = core_transformer_config_from_args(args) if config is None else config
    spec = get_gpt_layer_local_spec if args.transformer_impl == "local" else get_gpt_layer_with_transformer_engine_spec
    layer_spec = spec(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm)
    kwargs = {} if vp_stage is None else {"vp_stage": vp_stage}
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    return GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, position_embedding_type=args.position_embedding_type,
                    **kwargs)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, tokenizer=get_tokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples, lambda: True, config).build()


def loss_func(loss_mask, output_tensor):
    """Summed token loss and token count; Megatron's schedule divides (or, per token, it does not)."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model, return_schedule_plan=False):
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in next(data_iterator).items() if isinstance(v, torch.Tensor)}
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def main():
    import inspect

    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    parameters = list(inspect.signature(pretrain).parameters)
    if parameters[0] != "cfg_container":  # 0.17: pretrain parses the arguments itself
        pretrain(train_valid_test_datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
                 args_defaults={"tokenizer_type": "NullTokenizer"})
        return
    # 0.18+: the arguments become a configuration container first.
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(args_defaults={"tokenizer_type": "NullTokenizer"})
    cfg = pretrain_cfg_container_from_args(args)
    train_valid_test_datasets_provider.is_distributed = True
    pretrain(cfg, train_valid_test_datasets_provider, model_provider=model_provider,
             model_type=ModelType.encoder_or_decoder, forward_step_func=forward_step)


if __name__ == "__main__":
    main()
