# One customer-managed key per concern, rotated yearly; each policy lets the account administer it and
# only the services that encrypt with it use it.

# shared by both key policies: the account administers its keys
data "aws_iam_policy_document" "kms_admin" {
  # checkov:skip=CKV_AWS_111: a key policy's Resource "*" is the key itself; the account root administers its own key
  # checkov:skip=CKV_AWS_356: a key policy's Resource "*" is the key itself
  # checkov:skip=CKV_AWS_109: a key policy's Resource "*" is the key itself; the account root administers its own key
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }
}

data "aws_iam_policy_document" "kms_logs" {
  # checkov:skip=CKV_AWS_111: a key policy's Resource "*" is the key itself (the CloudWatch Logs grant is limited to this account's log groups by its condition)
  # checkov:skip=CKV_AWS_356: a key policy's Resource "*" is the key itself
  source_policy_documents = [data.aws_iam_policy_document.kms_admin.json]

  statement {
    sid       = "CloudWatchLogsEncrypt"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${local.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:*"]
    }
  }
  statement {
    sid       = "SnsAlarms"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com", "sns.amazonaws.com"]
    }
  }
}

resource "aws_kms_key" "logs" {
  description             = "${var.name}: CloudWatch log groups and the alarm topic"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms_logs.json
  tags                    = local.tags
}

data "aws_iam_policy_document" "kms_data" {
  source_policy_documents = [data.aws_iam_policy_document.kms_admin.json]

  statement {
    sid       = "ServicesInThisAccount"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey", "kms:CreateGrant"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["*"]
    }
    condition {
      test     = "StringEquals"
      variable = "kms:CallerAccount"
      values   = [local.account_id]
    }
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values = [for s in ["s3", "rds", "kafka", "elasticache", "secretsmanager", "eks", "ec2"] :
      "${s}.${local.region}.amazonaws.com"]
    }
  }
}

resource "aws_kms_key" "data" {
  description             = "${var.name}: S3 checkpoints and archives, RDS, MSK, ElastiCache, EKS secrets, EBS, Secrets Manager"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms_data.json
  tags                    = local.tags
}

resource "aws_kms_alias" "logs" {
  name          = "alias/${var.name}-logs"
  target_key_id = aws_kms_key.logs.key_id
}

resource "aws_kms_alias" "data" {
  name          = "alias/${var.name}-data"
  target_key_id = aws_kms_key.data.key_id
}
