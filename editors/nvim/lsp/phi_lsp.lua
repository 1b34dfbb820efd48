-- The phi-lsp config for `vim.lsp.enable('phi_lsp')` (Neovim 0.11+). Change it with
-- `require('phi_lsp').setup({...})` or `vim.lsp.config('phi_lsp', {...})`.
return require('phi_lsp').lsp_config()
